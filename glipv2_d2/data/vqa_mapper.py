"""VQA dataset dicts (see datasets/vqav2.py) -> GLIPv2 inputs with answer targets.

Outputs, training and test alike: "image", "height", "width", "prompt" (the question, with
" [MASK]" appended under MODEL.VQA.GROUNDED; see ``build_question_prompt``), and the record's own
fields ("question", "question_id", "answers", "question_type", ... stay for the evaluator).

Training adds:

- "vqa_targets": ``(MODEL.VQA.NUM_ANSWERS,)`` float soft scores min(#annotators / 3, 1) over the
  answer vocabulary (``soft_scores``); answers outside it are dropped (the training loader counts
  them once per dataset in a warning, ``count_unknown_answers``);
- "instances": the record's boxes whose phrases the prompt holds (question spans, and the [MASK]
  token for "grounds_answer" boxes when grounded), with ``positive_map`` over the prompt's tokens;
- "loss_weight": 0 for a record without such boxes, so the detector's grounding losses skip the
  image (plain VQA data says nothing about where objects are), else 1.

Images are resized as for detection but never flipped: questions and answers may say left or right.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from transformers import PreTrainedTokenizerBase

from .mappers import build_detection_augmentations, read_and_augment, sample_randomness, transformed_instances
from .prompt_builder import PromptBuilder
from .prompts import check_spans, token_map_to_positive_map
from .vqa_answers import AnswerVocabulary, count_unknown_answers, soft_scores
from .vqa_prompts import QuestionPrompt, build_question_prompt

__all__ = ["VQAMapper", "question_phrases"]

logger = logging.getLogger(__name__)


def _where(record: dict) -> str:
    return f"{record.get('file_name')} (question {record.get('question_id')})"


def question_phrases(record: dict) -> list[list[list[int]]]:
    """The distinct span lists of the record's boxes that name a phrase of the question, in order
    of first appearance: the question's phrases (labels 0, 1, ...)."""
    phrases: list[list[list[int]]] = []
    for index, obj in enumerate(record.get("annotations") or []):
        spans = check_spans(obj.get("tokens_positive") or [], record["question"], f"{_where(record)}, box #{index}")
        if spans and spans not in phrases:
            phrases.append(spans)
    return phrases


class VQAMapper:
    """VQA record -> model input (module docstring). Every random choice of a training sample
    derives from the seed it is called with."""

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: Sequence[T.Augmentation],
        image_format: str,
        prompt_builder: PromptBuilder,
        grounded: bool,
        vocabulary: AnswerVocabulary | None = None,
    ):
        if is_train and vocabulary is None:
            raise ValueError("training VQA needs the answer vocabulary (MODEL.VQA.ANSWER_VOCAB_FILE)")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.prompt_builder = prompt_builder
        self.grounded = grounded
        self.vocabulary = vocabulary

    @classmethod
    def from_config(
        cls, cfg: CfgNode, is_train: bool = True, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> dict:
        """Pass the model's tokenizer (``model.tokenizer``); without one, the config's is built."""
        augmentations = [a for a in build_detection_augmentations(cfg, is_train) if not isinstance(a, T.RandomFlip)]
        vocabulary = None
        if is_train:
            vocabulary = AnswerVocabulary.load(cfg.MODEL.VQA.ANSWER_VOCAB_FILE)
            if len(vocabulary) != cfg.MODEL.VQA.NUM_ANSWERS:
                raise ValueError(
                    f"MODEL.VQA.ANSWER_VOCAB_FILE {cfg.MODEL.VQA.ANSWER_VOCAB_FILE!r} has {len(vocabulary)} answers "
                    f"but MODEL.VQA.NUM_ANSWERS is {cfg.MODEL.VQA.NUM_ANSWERS}; make them agree"
                )
        return {
            "is_train": is_train,
            "augmentations": augmentations,
            "image_format": cfg.INPUT.FORMAT,
            "prompt_builder": PromptBuilder(cfg, tokenizer),
            "grounded": cfg.MODEL.VQA.GROUNDED,
            "vocabulary": vocabulary,
        }

    def report_unknown_answers(self, dataset_name: str, records: Sequence[dict]) -> int:
        """Warn, once per training set, how many annotator answers lie outside the vocabulary (training
        drops them) and how many questions keep no answer (all-zero targets); returns the first count."""
        unknown, total, unanswerable = count_unknown_answers(records, self.vocabulary)
        if unknown:
            logger.warning(
                "%s: %d of %d annotator answers are not in the %d-answer vocabulary (MODEL.VQA.ANSWER_VOCAB_FILE) "
                "and are dropped from the targets; %d of %d questions keep no answer (all-zero targets)",
                dataset_name, unknown, total, len(self.vocabulary), unanswerable, len(records),
            )
        return unknown

    def question_prompt(self, record: dict) -> QuestionPrompt:
        """The record's question with its phrases (and [MASK] when grounded); errors name the record."""
        try:
            return build_question_prompt(
                self.prompt_builder, record.get("question"), question_phrases(record), grounded=self.grounded
            )
        except ValueError as error:
            raise ValueError(f"{_where(record)}: {error}") from None

    def _instances(self, record: dict, question: QuestionPrompt, transforms: T.TransformList,
                   image_hw: tuple[int, int]):
        """Boxes with a phrase in the prompt, each row of positive_map the tokens of its phrases."""
        phrases = question_phrases(record)
        kept, rows = [], []
        for index, obj in enumerate(record.get("annotations") or []):
            spans = check_spans(obj.get("tokens_positive") or [], record["question"], f"{_where(record)}, box #{index}")
            labels = [phrases.index(spans)] if spans else []
            if obj.get("grounds_answer") and question.answer_label is not None:
                labels.append(question.answer_label)
            if labels:
                kept.append({k: v for k, v in obj.items() if k not in ("tokens_positive", "grounds_answer")})
                rows.append(labels)
        label_to_tokens = question.prompt.label_to_tokens
        positive_map = torch.zeros((len(rows), len(question.prompt)), dtype=torch.bool)
        for row, labels in enumerate(rows):
            positive_map[row] = token_map_to_positive_map(label_to_tokens, labels, len(question.prompt)).bool().any(0)
        instances = transformed_instances(kept, transforms, image_hw, False, "polygon", _where(record))
        instances.positive_map = positive_map
        return utils.filter_empty_instances(instances)

    def __call__(self, dataset_dict: dict, seed: int | None = None) -> dict:
        record = copy.deepcopy(dataset_dict)
        question = self.question_prompt(record)
        with sample_randomness(seed):
            image, transforms = read_and_augment(record, self.image_format, self.augmentations)
        record["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        record["prompt"] = question.prompt
        if not self.is_train:
            return record
        if not record.get("answers"):
            raise ValueError(f"{_where(record)}: a training VQA record needs its annotators' 'answers'")
        record["vqa_targets"], _ = soft_scores(record["answers"], self.vocabulary)
        record["instances"] = self._instances(record, question, transforms, image.shape[:2])
        record["loss_weight"] = 1.0 if len(record["instances"]) else 0.0
        record.pop("annotations", None)
        return record
