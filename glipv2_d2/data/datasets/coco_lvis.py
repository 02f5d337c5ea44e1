"""COCO-format detection / grounding data, COCO 2017 and LVIS v1, registered for GLIPv2.

Detectron2's own loaders do the parsing; this module only adds what the GLIPv2 data contract
needs on top of them: the "task" of every dict, the image-level "caption" (and any other
image-level keys) and the per-annotation "tokens_positive" spans of MDETR-style files, and
the checks a custom json needs before anything trains on it (unique image ids, sound boxes).
"""

import json
import logging
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
from .annotation_checks import box_drop_reason, mask_drop_reason
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


def _counted(dropped: Counter[str]) -> str:
    return ", ".join(f"{count} with {reason}" for reason, count in dropped.most_common())


def _drop_unusable_annotations(dicts: list[dict], json_file: str, check_boxes: bool = True) -> None:
    """Remove boxes no model can learn from and masks that draw nothing, with one warning per file
    that counts them by reason; the mapper would drop the boxes anyway, but silently, and a mask
    that draws nothing would become an empty loss target. A mask is removed without its box: the
    box still trains detection (see ``transformed_instances`` for images left with some masks)."""
    dropped_boxes: Counter[str] = Counter()
    dropped_masks: Counter[str] = Counter()
    first_mask = ""
    total = 0
    for record in dicts:
        kept = []
        for index, anno in enumerate(record["annotations"]):
            total += 1
            where = _annotation_name(json_file, record, anno, index)
            reason = box_drop_reason(anno, record, where) if check_boxes else None
            anno.pop("id", None)
            if reason is not None:
                dropped_boxes[reason] += 1
                continue
            mask_reason = mask_drop_reason(anno, record["height"], record["width"], where)
            if mask_reason is not None:
                dropped_masks[mask_reason] += 1
                first_mask = first_mask or where
            kept.append(anno)
        record["annotations"] = kept
    if dropped_boxes:
        logger.warning(
            "%s: dropped %d of %d boxes: %s", json_file, sum(dropped_boxes.values()), total, _counted(dropped_boxes)
        )
    if dropped_masks:
        logger.warning(
            "%s: removed the masks of %d annotations (their boxes kept): %s; the first is %s",
            json_file, sum(dropped_masks.values()), _counted(dropped_masks), first_mask,
        )


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
    warning. Masks likewise: an RLE whose size is not the image's is an error; polygons that draw
    nothing (fewer than 3 points, entirely outside the image) are removed, and an annotation left
    without polygons (or with an empty list) keeps its box but loses its mask, counted in one
    warning naming the first. (Detectron2's loader itself drops an annotation, box included, whose
    every polygon has fewer than 3 points, with its own counted warning.) The image-level keys and
    the check that image ids are unique need a second parse of the json (Detectron2's loader
    discards both), so pass image_keys=() only for large files known to be sound, e.g. the
    official COCO instances.
    """
    # "segmentation" as an extra key keeps an empty polygon list visible (Detectron2 skips it silently).
    extra_keys = ["tokens_positive", "id", "segmentation"]
    dicts = load_coco_json(json_file, image_root, dataset_name, extra_annotation_keys=extra_keys)
    image_keys = tuple(image_keys)
    fields = _image_fields(json_file, image_keys) if image_keys else {}
    _drop_unusable_annotations(dicts, json_file)
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
    """Detectron2's LVIS loader and v1 metadata (LVISEvaluator), plus the task; masks are checked
    as in load_grounding_coco_json (the official boxes are left as Detectron2 loads them)."""

    def load() -> list[dict]:
        dicts = load_lvis_json(json_file, image_root, name, extra_annotation_keys=["id"])
        _drop_unusable_annotations(dicts, json_file, check_boxes=False)
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
