"""Detections as JSON records in one documented schema (``glipv2_d2/detections.schema.json``), written by
tools/demo.py and offered for download by the web demo, so that both outputs read the same way.

A record::

    {"schema": "glipv2-d2/detections/1",
     "image": file path or name, "image_size": [height, width],
     "prompt": the categories (list) or caption (string) as given,
     "prompt_texts": the text(s) the model read: one, or one per chunk of a long vocabulary,
     "detections": [
       {"box_xyxy": [x0, y0, x1, y1] in the input image's pixels,
        "score": mean probability of the label's tokens (times centerness, square-rooted, as GLIP),
        "label": index of the category in the prompt, or of the phrase in the caption,
        "phrase": that category name or phrase,
        "prompt_index": which of "prompt_texts" the label was read from,
        "token_spans": [[start, end), ...] token positions ([CLS] is 0) whose mean scored the box,
        "char_spans": [[start, end), ...] the characters of prompt_texts[prompt_index] they cover,
        "mask_rle": only when the model segments: {"size": [height, width], "counts": str}, COCO RLE
                    of the mask at the input image's size; pycocotools.mask.decode({"size": size,
                    "counts": counts.encode()}) reads it back}]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.structures import Instances
from transformers import PreTrainedTokenizerBase

from .structures import Prompt

__all__ = [
    "SCHEMA_FILE",
    "SCHEMA_ID",
    "LabelLocation",
    "detection_record",
    "label_locations",
    "load_schema",
    "mask_to_rle",
]

SCHEMA_ID = "glipv2-d2/detections/1"
SCHEMA_FILE = Path(__file__).resolve().parent / "detections.schema.json"


@dataclass(frozen=True)
class LabelLocation:
    """Where a label sits in the prompt(s): which prompt text, which tokens, which characters."""

    prompt_index: int
    token_spans: list[list[int]]
    char_spans: list[list[int]]


def load_schema() -> dict:
    """The JSON Schema every record follows (for validators and the documentation)."""
    return json.loads(SCHEMA_FILE.read_text())


def _runs(indices: list[int]) -> list[list[int]]:
    """Sorted indices -> [start, end) runs of consecutive ones."""
    runs: list[list[int]] = []
    for index in sorted(set(indices)):
        if runs and runs[-1][1] == index:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1])
    return runs


def label_locations(prompts: list[Prompt], tokenizer: PreTrainedTokenizerBase) -> dict[int, LabelLocation]:
    """Each label's prompt, token runs and character runs (a prompt is re-tokenized for its offsets)."""
    locations: dict[int, LabelLocation] = {}
    for prompt_index, prompt in enumerate(prompts):
        offsets = tokenizer(prompt.caption, return_offsets_mapping=True)["offset_mapping"]
        for label, tokens in prompt.label_to_tokens.items():
            token_runs = _runs(list(tokens))
            char_runs = [[int(offsets[start][0]), int(offsets[end - 1][1])] for start, end in token_runs]
            locations[int(label)] = LabelLocation(prompt_index, token_runs, char_runs)
    return locations


def mask_to_rle(mask: np.ndarray | torch.Tensor) -> dict:
    """A boolean (H, W) mask as COCO RLE with str counts, so that it can be written as JSON."""
    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _detection(box, score: float, label: int, phrase: str, location: LabelLocation | None) -> dict:
    detection = {"box_xyxy": [round(float(v), 2) for v in box], "score": round(float(score), 4),
                 "label": int(label), "phrase": str(phrase)}
    if location is not None:
        detection.update(prompt_index=location.prompt_index, token_spans=location.token_spans,
                         char_spans=location.char_spans)
    return detection


def detection_record(
    image: str,
    prompt: str | list[str],
    instances: Instances,
    prompts: list[Prompt] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict:
    """The schema's record of one image's detections; with the model's ``prompts`` and ``tokenizer``
    each detection also says where its label sits in the prompt (both are required by the schema;
    without them only a partial record for a stand-in predictor is produced)."""
    locations = label_locations(prompts, tokenizer) if prompts is not None and tokenizer is not None else {}
    detections = [
        _detection(box, score, label, phrase, locations.get(int(label)))
        for box, score, label, phrase in zip(
            instances.pred_boxes.tensor.tolist(), instances.scores.tolist(),
            instances.pred_classes.tolist(), instances.pred_phrases,
        )
    ]
    if instances.has("pred_masks"):
        for detection, mask in zip(detections, instances.pred_masks.cpu()):
            detection["mask_rle"] = mask_to_rle(mask)
    height, width = instances.image_size
    return {
        "schema": SCHEMA_ID,
        "image": image,
        "image_size": [int(height), int(width)],
        "prompt": prompt,
        "prompt_texts": [p.caption for p in prompts] if prompts is not None else [],
        "detections": detections,
    }
