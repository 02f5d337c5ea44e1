"""PhraseCut (VGPhraseCut, Wu et al. 2020): referring segmentation on Visual Genome images.

The release (github.com/ChenyunWu/PhraseCutDataset) ships one json per split, refer_{split}.json:
a list of "tasks", each a phrase-region pair with "task_id", "image_id" (a Visual Genome id),
"phrase", "phrase_structure" (name, attributes, relations, "type"), "ann_ids", "instance_boxes"
([x, y, w, h] per referred instance) and "Polygons" (per instance a list of polygons, each a list
of [x, y] points). The images are Visual Genome's, saved as images/{image_id}.jpg, and
image_data_split.json lists their sizes.

Each task becomes one grounding record whose caption is the phrase and whose annotations are ALL
the instances it refers to (box + polygon mask, category 0), each with one span covering the whole
phrase: the format GroundingMapper trains on and evaluators read (see load_phrasecut_json).
"""

import json
import logging
import os
from collections import Counter
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager
from PIL import Image

from .annotation_checks import box_drop_reason, mask_drop_reason
from .catalog import unregister_dataset

__all__ = ["PHRASECUT_EVALUATOR_TYPE", "load_phrasecut_json", "register_phrasecut", "register_phrasecut_datasets"]

logger = logging.getLogger(__name__)

PHRASECUT_EVALUATOR_TYPE = "phrasecut"
_SPLITS = ("train", "val", "test", "miniv")
# The loader's file_paths.py reads image_data_split.json; the README names image_data_split3000.json.
_IMAGE_INFO_FILES = ("image_data_split.json", "image_data_split3000.json")
_DEFAULT_PHRASE_TYPE = "other"


def _read_json(path: str) -> Any:
    with PathManager.open(path) as f:
        return json.load(f)


class _ImageSizes:
    """(height, width) of a Visual Genome image: from image_data_split.json when given, else read
    from the image file's header (for a folder of images without the metadata file)."""

    def __init__(self, image_root: str, image_info_json: str | None):
        self.image_root = image_root
        self.known: dict[int, tuple[int, int]] = {}
        if image_info_json:
            for info in _read_json(image_info_json):
                self.known[int(info["image_id"])] = (int(info["height"]), int(info["width"]))

    def file_name(self, image_id: int) -> str:
        return os.path.join(self.image_root, f"{image_id}.jpg")

    def __call__(self, image_id: int) -> tuple[int, int]:
        if image_id not in self.known:
            with PathManager.open(self.file_name(image_id), "rb") as f:
                width, height = Image.open(f).size
            self.known[image_id] = (height, width)
        return self.known[image_id]


def _phrase_span(phrase: str) -> list[int]:
    """[start, end) of the phrase without its surrounding blanks."""
    start = len(phrase) - len(phrase.lstrip())
    return [start, len(phrase.rstrip())]


def _flat_polygon(points: Any, where: str) -> list[float]:
    """[[x, y], ...] -> [x0, y0, x1, y1, ...], COCO's polygon form."""
    if not isinstance(points, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in points):
        raise ValueError(f"{where}: a polygon must be a list of [x, y] points, got {points!r}")
    return [float(v) for point in points for v in point]


def _phrase_type(task: dict) -> str:
    """PhraseCut's kind of phrase: "name", "attribute", "relation" or "verbose" (else "other")."""
    structure = task.get("phrase_structure")
    if not isinstance(structure, dict):
        return _DEFAULT_PHRASE_TYPE
    return structure.get("type") or _DEFAULT_PHRASE_TYPE


def _required(task: dict, key: str, where: str) -> Any:
    if key not in task:
        raise ValueError(f"{where}: missing {key!r} (keys: {sorted(task)})")
    return task[key]


def _instances(task: dict, record: dict, span: list[int], where: str, dropped: Counter[str]) -> list[dict]:
    boxes = _required(task, "instance_boxes", where)
    polygons = _required(task, "Polygons", where)
    if len(boxes) != len(polygons):
        raise ValueError(f"{where}: {len(boxes)} instance_boxes but {len(polygons)} Polygons; one per instance")
    annotations = []
    for index, (box, instance_polygons) in enumerate(zip(boxes, polygons)):
        instance_where = f"{where}, instance #{index}"
        anno = {
            "bbox": box,
            "segmentation": [_flat_polygon(points, instance_where) for points in instance_polygons],
        }
        reason = box_drop_reason(anno, record, instance_where) or mask_drop_reason(
            anno, record["height"], record["width"], instance_where
        )
        if reason is not None:  # a referring target needs both: the mask is what is evaluated
            dropped[f"instances with {reason}"] += 1
            continue
        anno.update(
            bbox=[float(v) for v in box],
            bbox_mode=BoxMode.XYWH_ABS,
            category_id=0,
            iscrowd=0,
            tokens_positive=[span],
            phrase_ids=[0],
        )
        annotations.append(anno)
    return annotations


def _record(task: dict, index: int, sizes: _ImageSizes, where: str, dropped: Counter[str]) -> dict | None:
    phrase = _required(task, "phrase", where)
    if not isinstance(phrase, str) or not phrase.strip():
        raise ValueError(f"{where}: 'phrase' must be a non-empty string, got {phrase!r}")
    image_id = int(_required(task, "image_id", where))
    height, width = sizes(image_id)
    record = {
        "file_name": sizes.file_name(image_id),
        "height": height,
        "width": width,
        "image_id": index,
        "original_img_id": image_id,
        "task_id": str(task.get("task_id", index)),
        "task": "grounding",
        "weak": False,
        "caption": phrase,
    }
    span = _phrase_span(phrase)
    record["annotations"] = _instances(task, record, span, f"{where} ({record['file_name']})", dropped)
    if not record["annotations"]:
        return None
    phrase_type = _phrase_type(task)
    record["phrases"] = [
        {"phrase_id": 0, "tokens_positive": [span], "phrase_type": phrase_type, "phrase_types": [phrase_type]}
    ]
    return record


def load_phrasecut_json(
    refer_json: str, image_root: str, image_info_json: str | None = None, require_structure: bool = True
) -> list[dict]:
    """Dataset dicts of a PhraseCut refer_{split}.json, one per task (phrase-region pair).

    Each record: "file_name" (image_root/{VG image id}.jpg), "height", "width", "image_id" (the
    task's position in the file: unique per record, as evaluators need), "original_img_id" (the
    Visual Genome id), "task_id", "task" "grounding", "weak" False, "caption" (the phrase),
    "annotations" (every referred instance: "bbox" XYWH_ABS, "segmentation" COCO polygons,
    "category_id" 0, "iscrowd" 0, "tokens_positive" [[start, end)] the whole phrase, "phrase_ids"
    [0]) and "phrases" (one: phrase_id 0, the same span, "phrase_type" from phrase_structure).

    Tasks without a phrase_structure are skipped unless ``require_structure`` is False, as the
    official RefVGLoader does by default (so evaluation scores the official set of phrases).
    Malformed tasks are errors naming the file and task; instances whose box or mask draws nothing
    (see annotation_checks) are dropped, and tasks left with no instance are skipped, all counted
    in one warning (the official evaluation would score such a task against an empty mask).
    Image sizes come from ``image_info_json`` (image_data_split.json), else from the image files.
    """
    tasks = _read_json(refer_json)
    if not isinstance(tasks, list):
        raise ValueError(f"{refer_json}: a PhraseCut refer file is a list of tasks, got {type(tasks).__name__}")
    sizes = _ImageSizes(image_root, image_info_json)
    dropped: Counter[str] = Counter()
    records = []
    for index, task in enumerate(tasks):
        where = f"{refer_json}: task #{index} ({task.get('task_id', 'no task_id')})"
        if require_structure and not task.get("phrase_structure"):
            dropped["task without phrase_structure"] += 1
            continue
        record = _record(task, index, sizes, where, dropped)
        if record is None:
            dropped["task left without instances"] += 1
            continue
        records.append(record)
    if dropped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in dropped.most_common())
        logger.warning("%s: %d of %d tasks loaded; dropped %s", refer_json, len(records), len(tasks), reasons)
    return records


def register_phrasecut(
    name: str, refer_json: str, image_root: str, image_info_json: str | None = None, require_structure: bool = True
) -> None:
    """Register a PhraseCut refer json lazily, evaluated by the "phrasecut" evaluator type.

    The metadata names the one category "object" (every instance is category 0) and has no
    "json_file": Detectron2's COCOEvaluator then builds its COCO-format ground truth from the
    records, which is how the referring set gets mask AP.
    """
    unregister_dataset(name)
    DatasetCatalog.register(
        name, lambda: load_phrasecut_json(refer_json, image_root, image_info_json, require_structure)
    )
    MetadataCatalog.get(name).set(
        refer_json=refer_json,
        image_root=image_root,
        thing_classes=["object"],
        evaluator_type=PHRASECUT_EVALUATOR_TYPE,
    )


def register_phrasecut_datasets(root: str) -> None:
    """Register glipv2_phrasecut_{train,val,test,miniv} for the refer files present under
    root/phrasecut/ (see datasets/README.md); calling again re-points or removes them."""
    folder = os.path.join(root, "phrasecut")
    image_info = next(
        (os.path.join(folder, f) for f in _IMAGE_INFO_FILES if os.path.isfile(os.path.join(folder, f))), None
    )
    for split in _SPLITS:
        name = f"glipv2_phrasecut_{split}"
        unregister_dataset(name)
        refer_json = os.path.join(folder, f"refer_{split}.json")
        if os.path.isfile(refer_json):
            register_phrasecut(name, refer_json, os.path.join(folder, "images"), image_info)
