"""The VQA answer vocabulary (the classifier's classes) and the soft-score targets over it.

Answers are normalised with the official evaluation's rules (``normalize_answer``) before they are
counted or looked up, so "two" and "2" are one class, as in standard VQA code (BUTD, VinVL). The
vocabulary is the most frequent answers of the training questions, each question counted once by
the answer most of its annotators gave (VQAv2's "multiple_choice_answer"); 3,129 classes for
VQAv2 (BUTD's answers given to at least 9 questions of train + val).

A question's target for answer a is min(#annotators who gave a / 3, 1). Answers outside the
vocabulary get no target: they are dropped and counted (``count_unknown_answers``); a question
none of whose answers is in the vocabulary keeps an all-zero target, as in BUTD and VinVL.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from ..evaluation.vqa import question_answer_of_record
from ..evaluation.vqa_normalization import normalize_answer

__all__ = [
    "AnswerVocabulary",
    "build_answer_vocabulary",
    "count_unknown_answers",
    "soft_scores",
]

logger = logging.getLogger(__name__)

_MATCHES_FOR_FULL_SCORE = 3


class AnswerVocabulary:
    """Answer strings (normalised) <-> class indices; saved as a JSON list of answers."""

    def __init__(self, answers: Sequence[str]):
        self.answers = list(answers)
        if not self.answers:
            raise ValueError("the VQA answer vocabulary is empty")
        repeated = sorted(answer for answer, count in Counter(self.answers).items() if count > 1)
        if repeated:
            raise ValueError(f"the VQA answer vocabulary repeats answers {repeated[:10]}")
        self.index = {answer: i for i, answer in enumerate(self.answers)}

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: str) -> bool:
        return normalize_answer(answer) in self.index

    def id_of(self, answer: str) -> int | None:
        """The class of an answer after normalisation, None when it is not in the vocabulary."""
        return self.index.get(normalize_answer(answer))

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnswerVocabulary:
        """Read a vocabulary file written by ``save`` (a JSON list of answer strings)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"VQA answer vocabulary {str(path)!r} does not exist; write it with tools/build_vqa_vocab.py "
                "(MODEL.VQA.ANSWER_VOCAB_FILE names it)"
            )
        answers = json.loads(path.read_text())
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"VQA answer vocabulary {str(path)!r} must be a JSON list of answer strings")
        return cls(answers)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.answers, indent=0))
        os.replace(tmp, path)


def build_answer_vocabulary(
    records: Iterable[Mapping], max_answers: int = 3129, min_count: int = 1
) -> AnswerVocabulary:
    """The ``max_answers`` most frequent answers given to at least ``min_count`` questions of
    ``records`` (dataset dicts with "answers", optionally "multiple_choice_answer"); ties in
    frequency are ordered alphabetically, so the file is the same on every run."""
    counts = Counter(question_answer_of_record(record) for record in records)
    frequent = sorted((a for a, n in counts.items() if n >= min_count and a), key=lambda a: (-counts[a], a))
    return AnswerVocabulary(frequent[:max_answers])


def soft_scores(answers: Sequence[str], vocabulary: AnswerVocabulary) -> tuple[torch.Tensor, list[str]]:
    """``(len(vocabulary),)`` float target of one question's annotator answers, and the answers
    outside the vocabulary (normalised, each once)."""
    counts = Counter(normalize_answer(answer) for answer in answers)
    target = torch.zeros(len(vocabulary))
    unknown = []
    for answer, count in counts.items():
        index = vocabulary.index.get(answer)
        if index is None:
            unknown.append(answer)
        else:
            target[index] = min(count / _MATCHES_FOR_FULL_SCORE, 1.0)
    return target, unknown


def count_unknown_answers(records: Iterable[Mapping], vocabulary: AnswerVocabulary) -> tuple[int, int, int]:
    """(annotator answers outside the vocabulary, all annotator answers, questions left with no
    answer in it) over ``records``: what training drops."""
    unknown = total = unanswerable = 0
    for record in records:
        if not record.get("answers"):
            raise ValueError(f"training VQA question {record.get('question_id')!r} ({record.get('question')!r}) "
                             "has no annotator 'answers'")
        normalised = [normalize_answer(answer) for answer in record["answers"]]
        missing = sum(answer not in vocabulary.index for answer in normalised)
        unknown += missing
        total += len(normalised)
        unanswerable += missing == len(normalised)
    return unknown, total, unanswerable
