"""k-shot training subsets, as official GLIP samples them for ODinW (DATASETS.FEW_SHOT with
DATASETS.SHUFFLE_SEED, maskrcnn_benchmark COCODataset).

Official semantics kept: images without boxes are skipped; the images, sorted by id, are shuffled by
``random.Random(seed)`` (seed 0: not shuffled); walking that order, an image is taken when it helps
a category still short of k shots, and a shot is an image containing the category (a category
counts once per image, however many boxes it has there). One difference, so that no category ever
has more than k shots: official GLIP also takes an image that helps one category while another of
its categories is already full (overfilling that one); here such an image is passed over. The
official ODinW runs use seeds 3, 30 and 300 and k in 1, 3, 5, 10.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .datasets.catalog import unregister_dataset

__all__ = ["FEW_SHOT_SEEDS", "FEW_SHOTS", "few_shot_dataset_name", "register_few_shot", "sample_k_shot", "shot_counts"]

FEW_SHOTS = (1, 3, 5, 10)
FEW_SHOT_SEEDS = (3, 30, 300)  # official: fewshot_train_shot{k}_seed{3,30,300}.json


def _categories(record: dict) -> set[int]:
    return {annotation["category_id"] for annotation in record["annotations"]}


def shot_counts(records: Sequence[dict]) -> Counter[int]:
    """category id -> number of images containing it (its shots)."""
    return Counter(category for record in records for category in _categories(record))


def sample_k_shot(records: Sequence[dict], k: int, seed: int) -> list[dict]:
    """At most ``k`` shots of every category, the same records for the same (records, k, seed)."""
    if k < 1:
        raise ValueError(f"k-shot sampling needs k >= 1, got {k}")
    order = sorted((r for r in records if r["annotations"]), key=lambda r: r["image_id"])
    if seed:
        random.Random(seed).shuffle(order)
    shots: Counter[int] = Counter()
    chosen = []
    for record in order:
        present = _categories(record)
        if all(shots[c] < k for c in present):
            chosen.append(record)
            shots.update(present)
    return chosen


def few_shot_dataset_name(source: str, k: int, seed: int) -> str:
    return f"{source}_{k}shot_seed{seed}"


def register_few_shot(source: str, k: int, seed: int) -> str:
    """Register the k-shot subset of the registered ``source`` (same metadata) and return its name."""
    name = few_shot_dataset_name(source, k, seed)
    unregister_dataset(name)
    DatasetCatalog.register(name, lambda: sample_k_shot(DatasetCatalog.get(source), k, seed))
    metadata = {key: value for key, value in MetadataCatalog.get(source).as_dict().items() if key != "name"}
    MetadataCatalog.get(name).set(**metadata)
    return name
