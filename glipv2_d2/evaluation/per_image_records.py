"""What the per-phrase evaluators (Flickr30K recall, PhraseCut IoU) share: records kept per image,
gathered on the main process, each image counted once."""

import itertools
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import TypeVar

from detectron2.utils import comm

__all__ = ["gather_per_image", "check_each_image_once"]

Record = TypeVar("Record")


def gather_per_image(
    per_image: list[tuple[Hashable, Record]], distributed: bool
) -> list[tuple[Hashable, Record]] | None:
    """Every process's ``(image_id, record)`` pairs on the main process; None on the others."""
    if not distributed:
        return per_image
    comm.synchronize()
    gathered = comm.gather(per_image, dst=0)
    if not comm.is_main_process():
        return None
    return list(itertools.chain.from_iterable(gathered))


def check_each_image_once(per_image: Sequence[tuple[Hashable, object]], evaluation: str, record: str) -> None:
    """A record evaluated twice (repeated image ids, or a loader that yields an image again) would
    count its phrases twice: stop, naming the ids."""
    repeated = [image_id for image_id, count in Counter(i for i, _ in per_image).items() if count > 1]
    if repeated:
        raise ValueError(
            f"{evaluation}: image_ids {repeated[:10]} were evaluated more than once; each {record} needs its "
            "own image_id and the test loader must yield it once"
        )
