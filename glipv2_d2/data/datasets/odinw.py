"""The 13 ODinW datasets of GLIP's few-shot transfer table (GLIPv2 Table 12), from their standard
COCO-format folders, as official GLIP's configs/odinw_13/*.yaml name them.

The Roboflow exports list a category with id 0 that is the supercategory of the others (e.g.
"movable-objects" in AerialMaritimeDrone); GLIP drops it by overriding the categories with ids 1..K
(DATASETS.OVERRIDE_CATEGORY) and never prompts it. Here the vocabulary is the json's categories
without id 0 (or a "__background__" entry), in id order; boxes of a dropped category are dropped too,
counted in one warning. Evaluation is Detectron2's COCOEvaluator on the json itself (a category
without ground truth has no AP and does not enter the mean).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

from .catalog import unregister_dataset
from .coco_lvis import datasets_root, load_grounding_coco_json

__all__ = [
    "ODINW_13",
    "OdinwDataset",
    "load_odinw_json",
    "odinw_dataset_name",
    "odinw_vocabulary",
    "register_odinw",
    "register_odinw_datasets",
]

logger = logging.getLogger(__name__)

_WITHOUT_BACKGROUND = "annotations_without_background.json"


@dataclass(frozen=True)
class OdinwDataset:
    """One ODinW dataset: its Table 12 name, its folder under <root>/odinw and its splits
    (split -> (json file, image folder), both relative to that folder)."""

    name: str
    folder: str
    splits: dict[str, tuple[str, str]]
    eval_split: str = "val"

    def files(self, root: str) -> dict[str, tuple[str, str]]:
        base = os.path.join(root, "odinw", self.folder)
        return {split: (os.path.join(base, j), os.path.join(base, d)) for split, (j, d) in self.splits.items()}


def _roboflow(name: str, folder: str, *, minival: bool = False) -> OdinwDataset:
    """Roboflow's export: one folder per split, each with its json and its images."""
    splits = {"train": "train", "val": "valid", "test": "test"} | ({"minival": "mini_val"} if minival else {})
    return OdinwDataset(
        name, folder, {split: (f"{sub}/{_WITHOUT_BACKGROUND}", sub) for split, sub in splits.items()},
        eval_split="minival" if minival else "val",
    )


# Table 12's columns, in its order; evaluation on the split GLIP's configs test (val, or mini_val).
ODINW_13: tuple[OdinwDataset, ...] = (
    OdinwDataset("PascalVOC", "PascalVOC", {
        "train": (f"train/{_WITHOUT_BACKGROUND}", "train"),
        "val": (f"valid/{_WITHOUT_BACKGROUND}", "valid"),
        "test": (f"valid/{_WITHOUT_BACKGROUND}", "valid"),  # VOC ships no test split; GLIP tests on valid
    }),
    _roboflow("AerialDrone", "AerialMaritimeDrone/large"),
    _roboflow("Aquarium", "Aquarium/Aquarium Combined.v2-raw-1024.coco"),
    _roboflow("Rabbits", "CottontailRabbits"),
    _roboflow("EgoHands", "EgoHands/generic", minival=True),
    _roboflow("Mushrooms", "NorthAmericaMushrooms/North American Mushrooms.v1-416x416.coco"),
    _roboflow("Packages", "Packages/Raw"),
    _roboflow("Raccoon", "Raccoon/Raccoon.v2-raw.coco"),
    _roboflow("Shellfish", "ShellfishOpenImages/raw"),
    _roboflow("Vehicles", "VehiclesOpenImages/416x416", minival=True),
    OdinwDataset("Pistols", "pistols/export", {  # one image folder, one json per split
        split: (f"{split}_{_WITHOUT_BACKGROUND}", ".") for split in ("train", "val", "test")
    }),
    _roboflow("Pothole", "pothole"),
    _roboflow("Thermal", "thermalDogsAndPeople"),
)


def odinw_dataset_name(dataset: OdinwDataset, split: str) -> str:
    return f"glipv2_odinw_{dataset.name.lower()}_{split}"


def odinw_vocabulary(json_file: str) -> dict:
    """thing_classes and the id map of an ODinW json: its categories in id order, without the id-0
    supercategory / "__background__" entry that GLIP drops."""
    with PathManager.open(json_file) as f:
        categories = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    kept = [c for c in categories if c["id"] != 0 and c["name"] != "__background__"]
    if not kept:
        raise ValueError(f"{json_file}: no category besides the background / supercategory entry (id 0)")
    return {
        "thing_classes": [c["name"] for c in kept],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(kept)},
    }


def load_odinw_json(json_file: str, image_root: str, id_map: dict[int, int]) -> list[dict]:
    """Records with contiguous category ids; boxes of a category outside ``id_map`` are dropped."""
    records = load_grounding_coco_json(json_file, image_root, dataset_name=None, image_keys=())
    dropped = 0
    for record in records:
        kept = [a for a in record["annotations"] if a["category_id"] in id_map]
        dropped += len(record["annotations"]) - len(kept)
        for annotation in kept:
            annotation["category_id"] = id_map[annotation["category_id"]]
        record["annotations"] = kept
    if dropped:
        logger.warning("%s: dropped %d boxes of the background / supercategory entry (id 0)", json_file, dropped)
    return records


def register_odinw(dataset: OdinwDataset, root: str | os.PathLike | None = None) -> list[str]:
    """Register every split of ``dataset`` as glipv2_odinw_<name>_<split>; a missing json or image
    folder is an error naming it. The vocabulary is the train json's (every split shares it)."""
    root = str(root) if root is not None else datasets_root()
    files = dataset.files(root)
    for split, (json_file, image_root) in files.items():
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"ODinW {dataset.name}: the {split} split's annotation file {json_file} is missing")
        if not os.path.isdir(image_root):
            raise FileNotFoundError(f"ODinW {dataset.name}: the {split} split's image folder {image_root} is missing")
    vocabulary = odinw_vocabulary(files["train"][0])
    names = []
    for split, (json_file, image_root) in files.items():
        name = odinw_dataset_name(dataset, split)
        unregister_dataset(name)
        id_map = vocabulary["thing_dataset_id_to_contiguous_id"]
        DatasetCatalog.register(name, lambda j=json_file, i=image_root, m=id_map: load_odinw_json(j, i, m))
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco", **vocabulary)
        names.append(name)
    return names


def register_odinw_datasets(
    root: str | os.PathLike | None = None, datasets: tuple[OdinwDataset, ...] = ODINW_13
) -> list[OdinwDataset]:
    """Register the ``datasets`` whose folder exists under <root>/odinw (incomplete folders are an
    error naming the missing file) and return them."""
    root = str(root) if root is not None else datasets_root()
    present = [d for d in datasets if os.path.isdir(os.path.join(root, "odinw", d.folder))]
    for dataset in present:
        register_odinw(dataset, root)
    return present
