"""VQAv2 (Goyal et al. 2017): questions about COCO images, ten annotator answers each.

The release (visualqa.org) ships per split a questions json ({"data_subtype": "train2014",
"questions": [{"image_id", "question", "question_id"}]}) and, except for test, an annotations
json ({"annotations": [{"question_id", "image_id", "question_type", "answer_type",
"multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"}]}]}). Images
are COCO's, named COCO_<data_subtype>_<12-digit image id>.jpg in the subtype's folder.

Each question becomes one record (task "vqa"): "file_name", "image_id", "question_id", "question",
and with annotations "answers" (the raw annotator answers), "multiple_choice_answer",
"question_type", "answer_type". Grounded VQA records (e.g. the quick start's) add "annotations":
boxes (Detectron2 dicts) with "tokens_positive" spans into the question for the question's
phrases, and/or "grounds_answer": True for the boxes of the answer's entity (grounded on the
[MASK] token appended to the question).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.file_io import PathManager

from .catalog import unregister_dataset

__all__ = ["VQA_EVALUATOR_TYPE", "load_vqav2_json", "register_vqav2", "register_vqav2_datasets"]

logger = logging.getLogger(__name__)

VQA_EVALUATOR_TYPE = "vqa"
# split -> (questions file, annotations file or None, COCO image folder under coco/)
VQAV2_SPLITS = {
    "train": ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json", "train2014"),
    "val": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014"),
    "test-dev": ("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015"),
}


def _read_json(path: str) -> Any:
    with PathManager.open(path) as f:
        return json.load(f)


def _image_file(image_root: str, data_subtype: str, image_id: int) -> str:
    return os.path.join(image_root, f"COCO_{data_subtype}_{int(image_id):012d}.jpg")


def load_vqav2_json(questions_json: str, annotations_json: str | None, image_root: str) -> list[dict]:
    """One record per question (module docstring). A question whose annotation is missing, or an
    annotation of another image than its question's, is an error naming the question."""
    questions = _read_json(questions_json)
    data_subtype = questions.get("data_subtype")
    if not data_subtype:
        raise ValueError(f"{questions_json}: no 'data_subtype' (e.g. 'train2014'), which names the images")
    annotations = {}
    if annotations_json is not None:
        annotations = {a["question_id"]: a for a in _read_json(annotations_json)["annotations"]}
    records = []
    for question in questions["questions"]:
        qid, text = question["question_id"], question["question"]
        record = {
            "file_name": _image_file(image_root, data_subtype, question["image_id"]),
            "image_id": question["image_id"],
            "question_id": qid,
            "question": text,
            "task": "vqa",
        }
        if annotations_json is not None:
            annotation = annotations.get(qid)
            if annotation is None:
                raise ValueError(f"{annotations_json}: question {qid} ({text!r}) has no annotation")
            if annotation["image_id"] != question["image_id"]:
                raise ValueError(f"{annotations_json}: question {qid} is about image {question['image_id']} "
                                 f"but its annotation about image {annotation['image_id']}")
            record.update(
                answers=[a["answer"] for a in annotation["answers"]],
                multiple_choice_answer=annotation.get("multiple_choice_answer", ""),
                question_type=annotation.get("question_type", ""),
                answer_type=annotation.get("answer_type", ""),
            )
        records.append(record)
    logger.info("Loaded %d VQA questions from %s", len(records), questions_json)
    return records


def register_vqav2(name: str, questions_json: str, annotations_json: str | None, image_root: str) -> None:
    """Register one VQAv2-format split (evaluator "vqa"), read lazily."""
    unregister_dataset(name)
    DatasetCatalog.register(name, lambda: load_vqav2_json(questions_json, annotations_json, image_root))
    MetadataCatalog.get(name).set(
        questions_json=questions_json, annotations_json=annotations_json, image_root=image_root,
        evaluator_type=VQA_EVALUATOR_TYPE,
    )


def register_vqav2_datasets(root: str) -> None:
    """Register glipv2_vqav2_{train,val,test-dev} for the question files present under root/vqav2/
    (images under root/coco/<train2014|val2014|test2015>/, see datasets/README.md)."""
    for split, (questions_file, annotations_file, images) in VQAV2_SPLITS.items():
        name = f"glipv2_vqav2_{split}"
        unregister_dataset(name)
        questions_json = os.path.join(root, "vqav2", questions_file)
        if not os.path.isfile(questions_json):
            continue
        annotations_json = os.path.join(root, "vqav2", annotations_file) if annotations_file else None
        if annotations_json is not None and not os.path.isfile(annotations_json):
            logger.warning("%s exists without %s; %s is not registered", questions_json, annotations_json, name)
            continue
        register_vqav2(name, questions_json, annotations_json, os.path.join(root, "coco", images))
