"""Captioning sets: COCO Captions and Flickr30K on Karpathy's splits, and Flickr30K grounded captions.

Karpathy's split files (``dataset_coco.json`` / ``dataset_flickr30k.json`` from caption_datasets.zip)
list every image once with its split ("train", "restval", "val", "test"), file name (COCO: also the
"filepath" folder, train2014 / val2014) and reference sentences ("raw"). Each record here is one
image: "file_name", "image_id" (COCO's id; Flickr30K's numeric file name), "captions" (the raw
references) and "task": "captioning". Training on "train" uses "restval" too, as is standard.

Grounded captioning (paper app. D.2) trains on Flickr30K Entities' sentences with phrase boxes: the
MDETR annotations (``final_flickr_separateGT_train.json``) read by the grounding loader, kept to the
images of Karpathy's training split, so that the Karpathy val / test images scored by the caption
metrics are never trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .catalog import unregister_dataset
from .mdetr import load_mdetr_json

__all__ = [
    "CAPTIONING_TASK",
    "CAPTION_EVALUATOR_TYPE",
    "KARPATHY_SPLITS",
    "load_grounded_flickr30k_captions",
    "load_karpathy_captions",
    "register_caption_datasets",
    "register_karpathy_captions",
]

CAPTIONING_TASK = "captioning"  # records' "task": language-model training, no boxes
CAPTION_EVALUATOR_TYPE = "caption"  # metadata evaluator_type of caption test sets
KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
_FLICKR_SPLIT_FOLDERS = ("", "train", "val", "test")  # GLIP's layout may split the images per split


def load_karpathy_captions(json_file: str, image_root: str, splits: Sequence[str]) -> list[dict]:
    """One record per image of Karpathy ``splits`` in ``json_file`` (see the module doc)."""
    with open(json_file) as f:
        images = json.load(f)["images"]
    records = []
    for image in images:
        if image["split"] not in splits:
            continue
        captions = [sentence["raw"].strip() for sentence in image["sentences"]]
        if not captions or not all(captions):
            raise ValueError(f"{json_file}: image {image['filename']} has an empty or no reference caption")
        records.append({
            "file_name": _image_path(image_root, image),
            "image_id": int(image["cocoid"]) if "cocoid" in image else _flickr_id(image["filename"]),
            "captions": captions,
            "task": CAPTIONING_TASK,
        })
    if not records:
        raise ValueError(f"{json_file} has no image in the splits {list(splits)}")
    return records


def load_grounded_flickr30k_captions(mdetr_json: str, karpathy_json: str, image_root: str) -> list[dict]:
    """The MDETR Flickr30K sentences (phrase boxes, "grounding" records) of the images in Karpathy's
    training split (train + restval)."""
    with open(karpathy_json) as f:
        train_images = {image["filename"] for image in json.load(f)["images"]
                        if image["split"] in KARPATHY_SPLITS["train"]}
    return [record for record in load_mdetr_json(mdetr_json, image_root)
            if os.path.basename(record["file_name"]) in train_images]


def register_karpathy_captions(name: str, json_file: str, image_root: str, split: str) -> None:
    """Register one Karpathy split lazily, evaluated by the caption metrics."""
    unregister_dataset(name)
    splits = KARPATHY_SPLITS[split]
    DatasetCatalog.register(name, lambda: load_karpathy_captions(json_file, image_root, splits))
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type=CAPTION_EVALUATOR_TYPE, thing_classes=["object"]
    )


def register_caption_datasets(root: str) -> None:
    """glipv2_coco_karpathy_{train,val,test}, glipv2_flickr30k_karpathy_{train,val,test} and
    glipv2_flickr30k_grounded_captions_train under ``root``, each when its files exist
    (datasets/README.md)."""
    karpathy = os.path.join(root, "caption_datasets")
    flickr_images = os.path.join(root, "flickr30k", "flickr30k_images")
    sources = {
        "coco": (os.path.join(karpathy, "dataset_coco.json"), os.path.join(root, "coco")),
        "flickr30k": (os.path.join(karpathy, "dataset_flickr30k.json"), flickr_images),
    }
    for dataset, (json_file, image_root) in sources.items():
        for split in KARPATHY_SPLITS:
            name = f"glipv2_{dataset}_karpathy_{split}"
            unregister_dataset(name)
            if os.path.isfile(json_file):
                register_karpathy_captions(name, json_file, image_root, split)
    grounded = "glipv2_flickr30k_grounded_captions_train"
    unregister_dataset(grounded)
    mdetr_json = os.path.join(root, "mdetr_annotations", "final_flickr_separateGT_train.json")
    karpathy_json = sources["flickr30k"][0]
    if os.path.isfile(mdetr_json) and os.path.isfile(karpathy_json):
        train_root = os.path.join(flickr_images, "train")
        image_root = train_root if os.path.isdir(train_root) else flickr_images
        DatasetCatalog.register(
            grounded, lambda: load_grounded_flickr30k_captions(mdetr_json, karpathy_json, image_root)
        )
        MetadataCatalog.get(grounded).set(json_file=mdetr_json, image_root=image_root, thing_classes=["object"])


def _image_path(image_root: str, image: dict) -> str:
    """COCO: root/<filepath>/<filename>. Flickr30K: root/<filename>, or under the per-split folder
    (train / val / test of GLIP's layout) that holds it."""
    if "filepath" in image:
        return os.path.join(image_root, image["filepath"], image["filename"])
    for folder in _FLICKR_SPLIT_FOLDERS:
        path = os.path.join(image_root, folder, image["filename"])
        if os.path.isfile(path):
            return path
    return os.path.join(image_root, image["filename"])


def _flickr_id(filename: str) -> int:
    stem = os.path.splitext(os.path.basename(filename))[0]
    if not stem.isdigit():
        raise ValueError(f"Flickr30K image {filename!r} has no numeric name to use as image_id")
    return int(stem)
