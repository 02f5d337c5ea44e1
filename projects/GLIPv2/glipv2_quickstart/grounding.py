"""The synthetic shapes as grounding data and as pseudo-labelled (weak) caption data.

The captions the generator writes come with exact spans, so the scenes serve as MDETR-format
grounding data as they are. Jittering their boxes and scoring them by IoU stands in for the
pseudo boxes a grounding model puts on web captions (GLIPv2's Cap4M), which a score threshold
filters as it would filter a real model's output.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from glipv2_d2.data.datasets import load_mdetr_json, unregister_dataset

from .shapes import SYNTHETIC_CATEGORIES, default_synthetic_root, generate_synthetic_shapes, write_json_atomically

__all__ = ["pseudo_label_synthetic", "register_synthetic_grounding"]

GROUNDING_NAMES = ("glipv2_synthetic_grounding_train", "glipv2_synthetic_grounding_val")
CAPTION_NAME = "glipv2_synthetic_caption_train"


def _jittered_box(bbox: Sequence[float], width: int, height: int, rng: np.random.Generator) -> tuple[list, float]:
    """A box moved and rescaled at random, and its IoU with the original as the "score"."""
    x, y, w, h = bbox
    strength = rng.uniform(0.0, 0.6)
    dx, dy, dw, dh = rng.uniform(-strength, strength, 4)
    x0 = float(np.clip(x + dx * w, 0, width - 1))
    y0 = float(np.clip(y + dy * h, 0, height - 1))
    x1 = float(np.clip(x + dx * w + w * np.exp(dw), x0 + 1, width))
    y1 = float(np.clip(y + dy * h + h * np.exp(dh), y0 + 1, height))
    overlap_w = max(0.0, min(x1, x + w) - max(x0, x))
    overlap_h = max(0.0, min(y1, y + h) - max(y0, y))
    inter = overlap_w * overlap_h
    iou = inter / ((x1 - x0) * (y1 - y0) + w * h - inter)
    return [x0, y0, x1 - x0, y1 - y0], float(iou)


def pseudo_label_synthetic(data: dict, seed: int = 0) -> dict:
    """Turn a synthetic-shapes json into pseudo-labelled caption data, deterministically from ``seed``.

    Stands in for a grounding model's output on captions: the boxes of mentioned objects are
    jittered and scored by their IoU with the true box (in [0, 1]), so a score threshold keeps the
    better ones. Unmentioned objects are left out, as a grounding model only boxes phrases.
    """
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}
    annotations = []
    for anno in data["annotations"]:
        if not anno.get("tokens_positive"):
            continue
        rng = np.random.default_rng([seed, anno["image_id"], anno["id"]])
        bbox, score = _jittered_box(anno["bbox"], *sizes[anno["image_id"]], rng)
        pseudo = {k: v for k, v in anno.items() if k not in ("segmentation", "area")}
        annotations.append({**pseudo, "bbox": bbox, "score": score})
    return {**data, "annotations": annotations}


def register_synthetic_grounding(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    num_train: int = 600,
    num_val: int = 150,
    num_heldout: int = 100,
    caption_min_score: float = 0.5,
    pseudo_label_seed: int = 0,
) -> None:
    """Register the synthetic shapes as grounding data and as weak caption data.

    glipv2_synthetic_grounding_{train,val}: the scenes' captions with their spans (task
    "grounding"). glipv2_synthetic_caption_train: the train split with jittered, scored boxes
    (``pseudo_label_synthetic``, written next to the train json), boxes below ``caption_min_score``
    dropped (task "caption", weak). The data is generated on first use, like register_synthetic_shapes.
    """
    root = Path(root if root is not None else default_synthetic_root()).absolute()
    metadata = {
        "thing_classes": [c["name"] for c in SYNTHETIC_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(SYNTHETIC_CATEGORIES)},
    }

    def json_of(split: str) -> str:
        return generate_synthetic_shapes(root, seed, num_train, num_val, num_heldout)[split]

    def load_caption_train() -> list[dict]:
        train_json = Path(json_of("train"))
        pseudo_json = train_json.with_name(f"train_pseudo_captions_seed{pseudo_label_seed}.json")
        pseudo = pseudo_label_synthetic(json.loads(train_json.read_text()), pseudo_label_seed)
        write_json_atomically(pseudo_json, pseudo)
        return load_mdetr_json(str(pseudo_json), str(root / "train"), task="caption", min_score=caption_min_score)

    for name in (*GROUNDING_NAMES, CAPTION_NAME):
        unregister_dataset(name)
    for name, split in zip(GROUNDING_NAMES, ("train", "val")):
        DatasetCatalog.register(name, lambda split=split: load_mdetr_json(json_of(split), str(root / split)))
        extra = {"evaluator_type": "flickr30k"} if split == "val" else {}
        MetadataCatalog.get(name).set(image_root=str(root / split), **metadata, **extra)
    DatasetCatalog.register(CAPTION_NAME, load_caption_train)
    MetadataCatalog.get(CAPTION_NAME).set(image_root=str(root / "train"), min_score=caption_min_score, **metadata)
