"""COCO-format detection / grounding data, COCO 2017 and LVIS v1, registered for GLIPv2.

Detectron2's own loaders do the parsing; this module only adds what the GLIPv2 data contract
needs on top of them: the "task" of every dict, the image-level "caption" (and any other
image-level keys) and the per-annotation "tokens_positive" spans of MDETR-style files.
"""

import json
import os
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
    """image id -> the requested image-level keys it has (load_coco_json drops them)."""
    with PathManager.open(json_file) as f:
        images = json.load(f)["images"]
    return {img["id"]: {k: img[k] for k in keys if k in img} for img in images}


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

    The image-level keys need a second parse of the json (Detectron2's loader discards them), so
    pass image_keys=() for large files that have none, e.g. COCO instances.
    """
    dicts = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=["tokens_positive"])
    image_keys = tuple(image_keys)
    fields = _image_fields(json_file, image_keys) if image_keys else {}
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
