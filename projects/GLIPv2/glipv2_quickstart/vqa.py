"""The synthetic shapes as (grounded) VQA data: the quick start's VQAv2.

Every scene of the train and val splits already carries questions with answers computed from the
drawn objects ("qa", see scene_text.question_answers): "how many squares are there?", "what
colour is the circle?", "what shape is the red object?", "is there a red triangle?". Each becomes
one record in the VQAv2 loader's format (glipv2_d2/data/datasets/vqav2.py) with ten identical
annotator answers, its question type ("how many", "what colour", "what shape", "is there") and,
for grounded VQA, boxes read off the scene:

- the question's phrase ("squares", "circle", "red object", "red triangle") grounds on every drawn
  object it names (none for an absent "red triangle");
- the answer's entity (the [MASK] token) grounds on the objects the answer is about: the counted
  squares, the circle whose colour is asked, the red object, the red triangles when "yes".

The answer vocabulary (every answer of the train questions, most frequent first) is written next
to the split's json the first time the train split is loaded: annotations/vqa_answer_vocab.json.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog

from glipv2_d2.data.datasets import VQA_EVALUATOR_TYPE, load_grounding_coco_json, unregister_dataset
from glipv2_d2.data.vqa_answers import build_answer_vocabulary

from .scene_text import plural
from .shapes import ALL_PAIRS, SHAPES, default_synthetic_root, generate_synthetic_shapes

__all__ = ["VQA_VOCABULARY_FILE", "register_synthetic_vqa", "synthetic_vqa_records", "vqa_vocabulary_path"]

VQA_SPLITS = ("train", "val")
VQA_VOCABULARY_FILE = "vqa_answer_vocab.json"
ANNOTATORS = 10  # VQAv2 asks ten people; every synthetic "annotator" gives the true answer

Objects = list[tuple[str, str]]  # (colour, shape) per annotation
Matcher = Callable[[tuple[str, str]], bool]

_SHAPE_WORD = "|".join(SHAPES)
_PLURALS = "|".join(plural(shape) for shape in SHAPES)
_TEMPLATES = (
    ("how many", "number", re.compile(rf"how many (?P<phrase>{_PLURALS}) are there\?")),
    ("what colour", "other", re.compile(rf"what colour is the (?P<phrase>{_SHAPE_WORD})\?")),
    ("what shape", "other", re.compile(r"what shape is the (?P<phrase>\w+ object)\?")),
    ("is there", "yes/no", re.compile(rf"is there an? (?P<phrase>\w+ (?:{_SHAPE_WORD}))\?")),
)


def vqa_vocabulary_path(root: str | os.PathLike | None = None) -> Path:
    """Where the synthetic answer vocabulary is written (MODEL.VQA.ANSWER_VOCAB_FILE of the quick start)."""
    return Path(root if root is not None else default_synthetic_root()).absolute() / "annotations" / VQA_VOCABULARY_FILE


def _singular(phrase: str) -> str:
    return next(shape for shape in SHAPES if phrase == plural(shape))


def _about(question_type: str, words: list[str]) -> Matcher:
    """Which drawn objects a question of this type with these phrase words is about."""
    if question_type == "how many":
        shape = _singular(words[0])
        return lambda obj: obj[1] == shape
    if question_type == "what colour":
        return lambda obj: obj[1] == words[0]
    if question_type == "what shape":
        return lambda obj: obj[0] == words[0]
    return lambda obj: obj == (words[0], words[1])


def _question_targets(question: str) -> tuple[str, str, re.Match, Matcher]:
    """(question type, answer type, the phrase's match, which objects the question is about)."""
    for question_type, answer_type, pattern in _TEMPLATES:
        match = pattern.fullmatch(question)
        if match is not None:
            return question_type, answer_type, match, _about(question_type, match.group("phrase").split())
    raise ValueError(f"synthetic question {question!r} matches none of the generator's templates")


def _box_annotation(anno: dict, spans: list[list[int]]) -> dict:
    """An object the question names, which is also what its answer is about (the [MASK] box)."""
    return {
        "bbox": [float(v) for v in anno["bbox"]],
        "bbox_mode": anno["bbox_mode"],
        "category_id": 0,
        "iscrowd": 0,
        "tokens_positive": spans,
        "grounds_answer": True,
    }


def synthetic_vqa_records(scene_records: list[dict]) -> list[dict]:
    """VQA records of the scenes' questions (``scene_records`` as load_grounding_coco_json returns
    a synthetic json with its "qa" field, raw category ids)."""
    records = []
    for scene in scene_records:
        objects: Objects = [ALL_PAIRS[anno["category_id"] - 1] for anno in scene["annotations"]]
        for qa in scene["qa"]:
            question, answer = qa["question"], qa["answers"][0]["answer"]
            question_type, answer_type, match, about = _question_targets(question)
            spans = [[match.start("phrase"), match.end("phrase")]]
            annotations = [
                _box_annotation(anno, spans)
                for anno, obj in zip(scene["annotations"], objects) if about(obj)
            ]
            records.append({
                "file_name": scene["file_name"],
                "height": scene["height"],
                "width": scene["width"],
                "image_id": scene["image_id"],
                "question_id": len(records) + 1,
                "question": question,
                "answers": [answer] * ANNOTATORS,
                "multiple_choice_answer": answer,
                "question_type": question_type,
                "answer_type": answer_type,
                "task": "vqa",
                "annotations": annotations,
            })
    return records


def register_synthetic_vqa(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    num_train: int = 600,
    num_val: int = 150,
    num_heldout: int = 100,
) -> None:
    """Register glipv2_synthetic_vqa_{train,val} (evaluator "vqa"); the scenes are generated on
    first use, and loading the train split writes its answer vocabulary (``vqa_vocabulary_path``)."""
    root = Path(root if root is not None else default_synthetic_root()).absolute()
    for split in VQA_SPLITS:
        name = f"glipv2_synthetic_vqa_{split}"

        def load(split: str = split) -> list[dict]:
            json_file = generate_synthetic_shapes(root, seed, num_train, num_val, num_heldout)[split]
            records = synthetic_vqa_records(load_grounding_coco_json(json_file, str(root / split), image_keys=("qa",)))
            if split == "train":
                build_answer_vocabulary(records).save(vqa_vocabulary_path(root))
            return records

        unregister_dataset(name)
        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(image_root=str(root / split), evaluator_type=VQA_EVALUATOR_TYPE)
