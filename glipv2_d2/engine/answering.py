"""Questions about images answered by a model with a VQAHead: what ``GLIPv2Predictor.answer`` and
``answer_batch`` run.

Each question becomes the prompt the VQA mapper builds (``build_question_prompt``, with [MASK]
under MODEL.VQA.GROUNDED); its phrases (strings located in the question, or character spans) get
boxes like a caption's, and the [MASK] token's boxes, named "answer: <the answer>", show where
the answer is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data.prompts import locate_phrases
from ..data.vqa_prompts import QuestionPrompt, build_question_prompt

if TYPE_CHECKING:
    from .predictor import GLIPv2Predictor

__all__ = ["answer_questions", "question_prompt"]

PhrasesInput = Sequence[str] | None


def question_prompt(
    predictor: GLIPv2Predictor, question: str, phrases: PhrasesInput = None, spans: Sequence | None = None
) -> QuestionPrompt:
    """The question's prompt with its phrases (text located in the question, or spans) as labels."""
    located = [] if phrases is None and spans is None else locate_phrases(question, phrases=phrases, spans=spans)
    return build_question_prompt(
        predictor.prompt_builder,
        question,
        [spans for _, spans in located],
        grounded=predictor.cfg.MODEL.VQA.GROUNDED,
        phrase_names=[text for text, _ in located],
    )


@torch.no_grad()
def answer_questions(
    predictor: GLIPv2Predictor,
    images: Sequence[np.ndarray],
    questions: Sequence[str],
    phrases: Sequence[PhrasesInput] | None = None,
) -> list[dict]:
    """One result per (BGR image, question): "question", "answer", "score", "topk" (best first,
    {"answer", "score"} each) and "instances" (boxes of the question's phrases and of the answer,
    in the image's pixels, with pred_phrases). Every question is checked before the model runs."""
    if "VQAHead" not in predictor.model.task_heads:
        raise ValueError("this model has no VQAHead (MODEL.GLIPV2.TASK_HEADS): it cannot answer questions")
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions: give one question per image")
    phrases = list(phrases) if phrases is not None else [None] * len(questions)
    if len(phrases) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(phrases)} phrase lists")
    built = [question_prompt(predictor, q, p) for q, p in zip(questions, phrases)]
    results = []
    for start in range(0, len(images), predictor.batch_size):
        inputs = [predictor._model_input(image, question.prompt) for image, question in
                  zip(images[start:start + predictor.batch_size], built[start:start + predictor.batch_size])]
        results += predictor.model.inference(inputs)
    return [_answer_result(q, b, r) for q, b, r in zip(questions, built, results, strict=True)]


def _answer_result(question: str, built: QuestionPrompt, output: dict) -> dict:
    vqa = output["vqa"]
    names = dict(built.prompt.label_names)
    if built.answer_label is not None:
        names[built.answer_label] = f"answer: {vqa['answer']}"
    instances = output["instances"].to("cpu")
    instances.pred_phrases = np.array([names[int(c)] for c in instances.pred_classes], dtype=object)
    return {"question": question, "answer": vqa["answer"], "score": vqa["score"], "topk": vqa["topk"],
            "instances": instances}
