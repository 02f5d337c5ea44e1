"""A synthetic-shapes split in LVIS v1 format, so LVIS evaluation (standard and fixed AP) runs on a CPU.

LVIS is COCO's format plus federated annotation: each category carries its frequency group
("r"/"c"/"f" by the number of *train* images it occurs in) and each image lists the categories
verified absent (neg_category_ids) or not exhaustively annotated. The synthetic scenes are
annotated exhaustively, so every category missing from an image is a verified negative and none
is non-exhaustive; the heldout colour-shape pairs, absent from train, come out as rare.
"""

import json
import os
from collections import Counter
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_lvis_json

from glipv2_d2.data.datasets import unregister_dataset

from .shapes import write_json_atomically

__all__ = ["coco_to_lvis", "register_synthetic_lvis"]

_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "area", "segmentation")


def _frequency(image_count: int) -> str:
    """LVIS's frequency groups: rare < 10 train images <= common < 100 <= frequent."""
    return "r" if image_count < 10 else "c" if image_count < 100 else "f"


def coco_to_lvis(coco: dict, train: dict, image_root: str | os.PathLike) -> dict:
    """LVIS v1 json of the COCO-format split `coco`; category statistics come from `train`.

    Images are named by coco_url, as in LVIS; Detectron2's loader keeps its last two path parts
    (folder/file), so a file URL into `image_root` works with image_root's parent as LVIS root.
    """
    instances = Counter(a["category_id"] for a in train["annotations"])
    image_counts = Counter(c for c, _ in {(a["category_id"], a["image_id"]) for a in train["annotations"]})
    categories = [
        {
            "id": c["id"],
            "name": c["name"],
            "synonyms": [c["name"]],
            "def": f"a {c['name']} drawn on a synthetic image",
            "frequency": _frequency(image_counts[c["id"]]),
            "image_count": image_counts[c["id"]],
            "instance_count": instances[c["id"]],
        }
        for c in coco["categories"]
    ]
    present: dict[int, set[int]] = {img["id"]: set() for img in coco["images"]}
    for anno in coco["annotations"]:
        present[anno["image_id"]].add(anno["category_id"])
    all_ids = [c["id"] for c in coco["categories"]]
    images = [
        {
            "id": img["id"],
            "height": img["height"],
            "width": img["width"],
            "coco_url": Path(image_root, img["file_name"]).absolute().as_uri(),
            "neg_category_ids": [i for i in all_ids if i not in present[img["id"]]],
            "not_exhaustive_category_ids": [],
        }
        for img in coco["images"]
    ]
    annotations = [{k: anno[k] for k in _ANNOTATION_KEYS} for anno in coco["annotations"]]
    return {"images": images, "annotations": annotations, "categories": categories}


def register_synthetic_lvis(split: str = "val") -> None:
    """Register glipv2_synthetic_lvis_<split>: glipv2_synthetic_<split> as it is registered now, in
    LVIS format (evaluator_type "lvis", so the trainer evaluates it with LVIS AP or fixed AP).

    The LVIS json is written next to the COCO json whenever the split is loaded (DatasetCatalog.get),
    which also generates the shapes on first use; load it before building an evaluator by hand.
    Call again after re-registering the synthetic shapes (e.g. under another root).
    """
    source, train = MetadataCatalog.get(f"glipv2_synthetic_{split}"), MetadataCatalog.get("glipv2_synthetic_train")
    name = f"glipv2_synthetic_lvis_{split}"
    json_file = Path(source.json_file).with_name(f"lvis_{split}.json")
    image_root = Path(source.image_root)

    def load() -> list[dict]:
        DatasetCatalog.get(f"glipv2_synthetic_{split}")  # generates the dataset if needed
        coco, train_coco = (json.loads(Path(f).read_text()) for f in (source.json_file, train.json_file))
        write_json_atomically(json_file, coco_to_lvis(coco, train_coco, image_root))
        # LVIS's loader joins its root and the image folder as strings: keep the separator. Without a
        # dataset name it maps category id i to class i - 1, as thing_classes (ids 1..N) expect.
        dicts = load_lvis_json(str(json_file), str(image_root.parent) + os.sep)
        for record in dicts:
            record["task"] = "detection"
        return dicts

    unregister_dataset(name)
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=str(json_file),
        image_root=str(image_root),
        evaluator_type="lvis",
        thing_classes=list(source.thing_classes),
    )
