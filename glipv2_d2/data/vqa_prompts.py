"""A VQA question as the ``Prompt`` the model reads, shared by the VQA mapper and the predictor.

Grounded VQA (GLIPv2 section 3.3) appends the tokenizer's mask token to the question ("what colour
is the circle? [MASK]"): the [MASK] token stands for the answer, so the region-word grounding
loss can ground the answer's entity on it and inference returns its boxes like a phrase's. The
question's phrases are labels 0, 1, ... (in the order given) and the answer one more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..structures import Prompt
from .prompt_builder import PromptBuilder
from .prompts import check_spans, tokenize_prompts

__all__ = ["ANSWER_PHRASE", "QuestionPrompt", "build_question_prompt"]

ANSWER_PHRASE = "answer"  # label name of the [MASK] token until the predicted answer replaces it


@dataclass(frozen=True)
class QuestionPrompt:
    """The prompt of one question and the label of its [MASK] token (None when not grounded)."""

    prompt: Prompt
    answer_label: int | None


def build_question_prompt(
    builder: PromptBuilder,
    question: str,
    phrase_spans: Sequence[Sequence[Sequence[int]]] = (),
    *,
    grounded: bool,
    phrase_names: Sequence[str] | None = None,
) -> QuestionPrompt:
    """The question's prompt: ``phrase_spans[i]`` are the character spans of phrase i (label i);
    with ``grounded`` the mask token is appended after a space and gets label ``len(phrase_spans)``.

    An empty question, or one whose tokens (with the mask token) exceed the builder's token limit,
    is a ValueError saying so, before the model sees it.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"empty question {question!r}: a VQA question needs text")
    spans_per_label = {
        label: check_spans(spans, question, f"question {question!r}, phrase #{label}")
        for label, spans in enumerate(phrase_spans)
    }
    names = list(phrase_names) if phrase_names is not None else [
        " ".join(question[a:b] for a, b in spans) for spans in spans_per_label.values()
    ]
    label_names: Mapping[int, str] = dict(enumerate(names))
    caption, answer_label = question, None
    if grounded:
        mask = builder.tokenizer.mask_token
        if mask is None:
            raise ValueError("grounded VQA appends the tokenizer's mask token, but this tokenizer has none")
        caption = f"{question} {mask}"
        answer_label = len(spans_per_label)
        spans_per_label[answer_label] = [[len(question) + 1, len(caption)]]
        label_names = {**label_names, answer_label: ANSWER_PHRASE}
    # One token more than allowed reveals an overflow without tokenizing twice.
    tokenized = tokenize_prompts(builder.tokenizer, caption, builder.max_query_len + 1, warn_truncation=False)
    if len(tokenized["input_ids"][0]) > builder.max_query_len:
        raise ValueError(
            f"question exceeds the {builder.max_query_len}-token limit (MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN"
            f"{', with the [MASK] token' if grounded else ''}): {question[:80]!r}...; shorten it"
        )
    prompt = builder.encode(caption, spans_per_label, label_names=label_names, tokenized=tokenized)
    return QuestionPrompt(prompt, answer_label)
