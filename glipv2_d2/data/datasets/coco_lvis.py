"""COCO-format detection / grounding data, COCO 2017 and LVIS v1, registered for GLIPv2.

Detectron2's own loaders do the parsing; this module only adds what the GLIPv2 data contract
needs on top of them: the "task" of every dict, the image-level "caption" (and any other
image-level keys) and the per-annotation "tokens_positive" spans of MDETR-style files, and
the checks a custom json needs before anything trains on it (unique image ids, sound boxes).
"""

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_lvis_json
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata
from detectron2.data.datasets.lvis import get_lvis_instances_meta
from detectron2.utils.file_io import PathManager

from ..prompts import check_spans
from .catalog import unregister_dataset

__all__ = [
    "coco_category_metadata",
    "datasets_root",
    "load_grounding_coco_json",
    "register_grounding_coco",
    "register_coco_and_lvis",
]

logger = logging.getLogger(__name__)

# name -> (image root, json file), relative to the datasets root; Detectron2's folder conventions.
_COCO_SPLITS = {
    "glipv2_coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "glipv2_coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
}
# Objects365 v1 in COCO format (GLIP's "object365_dt_train"), the detection part of pre-training.
_OBJECTS365_SPLITS = {
    "glipv2_objects365_train": ("objects365/train", "objects365/annotations/objects365_train.json"),
}
# LVIS json files name images by coco_url; the image root is the folder holding train2017/ val2017/.
_LVIS_SPLITS = {
    "glipv2_lvis_v1_train": ("coco/", "lvis/lvis_v1_train.json"),
    "glipv2_lvis_v1_val": ("coco/", "lvis/lvis_v1_val.json"),
}
# The 5k-image LVIS minival used by GLIP / MDETR, under either of the names it is shipped with.
_LVIS_MINIVAL_NAME = "glipv2_lvis_v1_minival"
_LVIS_MINIVAL_JSONS = ("lvis/lvis_v1_minival.json", "coco/annotations/lvis_v1_minival_inserted_image_name.json")


def datasets_root() -> str:
    """$DETECTRON2_DATASETS, else "datasets" relative to the working directory, like Detectron2."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _image_fields(json_file: str, keys: Iterable[str]) -> dict[int, dict[str, Any]]:
    """image id -> the requested image-level keys it has (load_coco_json drops them).

    Also refuses a repeated image id: pycocotools keeps one of the images and gives it the boxes of
    both, so training would silently draw one image's boxes on another.
    """
    with PathManager.open(json_file) as f:
        images = json.load(f)["images"]
    repeated = [image_id for image_id, count in Counter(img["id"] for img in images).items() if count > 1]
    if repeated:
        raise ValueError(
            f"{json_file}: image id {repeated[0]} is used by more than one entry of 'images' "
            f"({len(repeated)} repeated ids in all); every image needs its own id"
        )
    return {img["id"]: {k: img[k] for k in keys if k in img} for img in images}


def _annotation_name(json_file: str, record: dict, anno: dict, index: int) -> str:
    """How errors name one annotation: file, image and the annotation's id (or its position)."""
    which = f"annotation id {anno['id']}" if "id" in anno else f"annotation #{index}"
    return f"{json_file}: image {record['image_id']} ({record['file_name']}), {which}"


def _drop_reason(anno: dict, record: dict, where: str) -> str | None:
    """Why a box cannot be trained on (None when it can); a malformed or negative-size box is an
    error, since Detectron2 would flip it into a different, valid-looking box."""
    if "bbox" not in anno:
        raise ValueError(f"{where}: has no 'bbox' (a 'segmentation' alone is not enough); add its box")
    box = anno["bbox"]
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
        raise ValueError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {box!r}")
    x, y, width, height = box
    if not all(math.isfinite(v) for v in box):
        return "NaN or infinite coordinates"
    if width < 0 or height < 0:
        raise ValueError(f"{where}: 'bbox' {box} has a negative width or height; COCO boxes are [x, y, w, h]")
    if width == 0 or height == 0:
        return "zero width or height"
    if x >= record["width"] or y >= record["height"] or x + width <= 0 or y + height <= 0:
        return "entirely outside the image"
    return None


def _drop_unusable_boxes(dicts: list[dict], json_file: str) -> None:
    """Remove boxes no model can learn from, with one warning per file that counts them by reason;
    the mapper would drop them anyway, but silently."""
    dropped: Counter[str] = Counter()
    total = 0
    for record in dicts:
        kept = []
        for index, anno in enumerate(record["annotations"]):
            total += 1
            reason = _drop_reason(anno, record, _annotation_name(json_file, record, anno, index))
            anno.pop("id", None)
            if reason is None:
                kept.append(anno)
            else:
                dropped[reason] += 1
        record["annotations"] = kept
    if dropped:
        reasons = ", ".join(f"{count} with {reason}" for reason, count in dropped.most_common())
        logger.warning("%s: dropped %d of %d boxes: %s", json_file, sum(dropped.values()), total, reasons)


def _check_spans(record: dict, json_file: str) -> None:
    """A span outside the caption would silently select wrong tokens later; refuse it here."""
    caption = record.get("caption")
    if caption is None:
        return
    for i, anno in enumerate(record["annotations"]):
        check_spans(anno.get("tokens_positive", ()), caption, f"{json_file}: image {record['image_id']} box #{i}")


def load_grounding_coco_json(
    json_file: str,
    image_root: str,
    dataset_name: str | None = None,
    task: str = "detection",
    image_keys: Iterable[str] = ("caption",),
) -> list[dict]:
    """load_coco_json plus "task", the image-level `image_keys` and per-annotation "tokens_positive".

    Bad boxes are refused here, at load time, naming file, image and annotation (a missing or
    negative-size "bbox"); boxes without area or outside their image are dropped with one counted
    warning. The image-level keys and the check that image ids are unique need a second parse of
    the json (Detectron2's loader discards both), so pass image_keys=() only for large files known
    to be sound, e.g. the official COCO instances.
    """
    dicts = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["tokens_positive", "id"])
    image_keys = tuple(image_keys)
    fields = _image_fields(json_file, image_keys) if image_keys else {}
    _drop_unusable_boxes(dicts, json_file)
    for record in dicts:
        record["task"] = task
        record.update(fields.get(record["image_id"], {}))
        _check_spans(record, json_file)
    return dicts


def coco_category_metadata(json_file: str) -> dict[str, Any]:
    """thing_classes and the id map of a COCO-format json exactly as load_coco_json will set them
    when loading, without loading the annotations."""
    with PathManager.open(json_file) as f:
        categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    return {
        "thing_classes": [c["name"] for c in categories],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }


def register_grounding_coco(
    name: str,
    json_file: str,
    image_root: str,
    extra_metadata: dict[str, Any] | None = None,
    task: str = "detection",
    image_keys: Iterable[str] = ("caption",),
) -> None:
    """Register a COCO-format json (COCO, ODinW, custom, MDETR-style grounding) for GLIPv2.

    Like Detectron2's register_coco_instances (evaluator_type "coco", json_file for
    COCOEvaluator), but the dicts carry "task", "caption" and "tokens_positive", and the metadata
    has thing_classes at once, since prompts are built from them before any data is loaded. When
    extra_metadata lacks thing_classes they are read from the json now, if it exists; pass them
    for very large files.
    """
    metadata = dict(extra_metadata or {})
    if "thing_classes" not in metadata and PathManager.isfile(json_file):
        metadata = {**coco_category_metadata(json_file), **metadata}
    image_keys = tuple(image_keys)
    DatasetCatalog.register(
        name, lambda: load_grounding_coco_json(json_file, image_root, name, task=task, image_keys=image_keys)
    )
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata)


def _register_lvis(name: str, json_file: str, image_root: str) -> None:
    """Detectron2's LVIS loader and v1 metadata (LVISEvaluator), plus the task."""

    def load() -> list[dict]:
        dicts = load_lvis_json(json_file, image_root, name)
        for record in dicts:
            record["task"] = "detection"
        return dicts

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="lvis", **get_lvis_instances_meta("lvis_v1")
    )


def _register_large_coco(name: str, json_file: str, image_root: str) -> None:
    """Register a training json too large to read at import (Objects365: ~1.5 GB) when it exists;
    Detectron2's loader sets thing_classes when the trainer loads it, before any prompt is built."""
    unregister_dataset(name)
    if not os.path.isfile(json_file):
        return
    DatasetCatalog.register(name, lambda: load_grounding_coco_json(json_file, image_root, name, image_keys=()))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco")


def register_coco_and_lvis(root: str) -> None:
    """Register COCO 2017 train/val, LVIS v1 train/val (and minival if its json is present) and
    Objects365 train (if its json is present).

    The names carry a "glipv2_" prefix so they never clash with Detectron2's builtin ones; calling
    again (e.g. with another root) replaces the previous registration of these names.
    """
    for name, (image_root, json_file) in _COCO_SPLITS.items():
        unregister_dataset(name)
        register_grounding_coco(
            name,
            os.path.join(root, json_file),
            os.path.join(root, image_root),
            extra_metadata=_get_builtin_metadata("coco"),
            image_keys=(),
        )
    for name, (image_root, json_file) in _OBJECTS365_SPLITS.items():
        _register_large_coco(name, os.path.join(root, json_file), os.path.join(root, image_root))
    splits = dict(_LVIS_SPLITS)
    minival = [j for j in _LVIS_MINIVAL_JSONS if os.path.isfile(os.path.join(root, j))]
    if minival:
        splits[_LVIS_MINIVAL_NAME] = ("coco/", minival[0])
    unregister_dataset(_LVIS_MINIVAL_NAME)  # a previous root may have had one
    for name, (image_root, json_file) in splits.items():
        unregister_dataset(name)
        # LVIS's loader joins image_root and the split folder as strings, so keep the trailing "/".
        _register_lvis(name, os.path.join(root, json_file), os.path.join(root, image_root))
