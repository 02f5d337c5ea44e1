"""The synthetic scenes' captions as a captioning validation set.

Training uses glipv2_synthetic_grounding_train as it is: its captions carry phrase boxes, so the
model learns grounded captioning (language model + grounding loss). Validation needs the caption
record form the caption evaluator reads: glipv2_synthetic_captions_val holds each val image with
its caption as the one reference.
"""

import os

from detectron2.data import DatasetCatalog, MetadataCatalog

from glipv2_d2.data.datasets import CAPTION_EVALUATOR_TYPE, CAPTIONING_TASK, unregister_dataset

from .grounding import GROUNDING_NAMES

__all__ = ["CAPTIONS_VAL_NAME", "register_synthetic_captions", "synthetic_caption_records"]

CAPTIONS_VAL_NAME = "glipv2_synthetic_captions_val"


def synthetic_caption_records(grounding_records: list[dict]) -> list[dict]:
    """One caption record per image of grounding records, its captions as the references."""
    by_image: dict[str, dict] = {}
    for record in grounding_records:
        entry = by_image.setdefault(record["file_name"], {
            "file_name": record["file_name"],
            "height": record["height"],
            "width": record["width"],
            "image_id": record["image_id"],
            "captions": [],
            "task": CAPTIONING_TASK,
        })
        entry["captions"].append(record["caption"])
    return list(by_image.values())


def register_synthetic_captions(root: str | os.PathLike | None = None) -> None:
    """Register glipv2_synthetic_captions_val over glipv2_synthetic_grounding_val (register that first)."""
    unregister_dataset(CAPTIONS_VAL_NAME)
    DatasetCatalog.register(
        CAPTIONS_VAL_NAME, lambda: synthetic_caption_records(DatasetCatalog.get(GROUNDING_NAMES[1]))
    )
    MetadataCatalog.get(CAPTIONS_VAL_NAME).set(evaluator_type=CAPTION_EVALUATOR_TYPE, thing_classes=["object"])
