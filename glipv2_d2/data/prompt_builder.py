"""Every ``Prompt`` a config's model reads is built here, so training, evaluation and the predictor
join category names with the same separator, token limit and chunking."""

from __future__ import annotations

import functools
import random
from collections.abc import Hashable, Iterable, Mapping, Sequence

from detectron2.config import CfgNode, configurable
from transformers import BatchEncoding, PreTrainedTokenizerBase

from ..modeling.language import build_tokenizer
from ..structures import Prompt
from .prompts import (
    DEFAULT_SEPARATOR,
    build_labeled_prompt,
    check_vocabulary,
    chunk_categories,
    encode_prompt,
    locate_phrases,
    sample_detection_prompt,
    tokenize_prompts,
    vocabulary_items,
)

__all__ = ["PromptBuilder"]


@functools.lru_cache(maxsize=32)
def _checked_vocabulary(
    items: tuple[tuple[Hashable, str], ...], tokenizer: PreTrainedTokenizerBase, max_len: int, keep_repeats: bool
) -> tuple[tuple[Hashable, str], ...]:
    """A predictor asked with the same vocabulary on every call checks (and warns about) it once."""
    return tuple(check_vocabulary(dict(items), tokenizer, max_len, keep_repeats=keep_repeats))


class PromptBuilder:
    """Tokenizes each prompt once, with the model's tokenizer, MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN,
    DATASETS.SEPARATOR between category names and TEST.PROMPT_CHUNK_SIZE names per evaluation prompt."""

    @configurable
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_query_len: int = 256,
        separator: str = DEFAULT_SEPARATOR,
        chunk_size: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.max_query_len = max_query_len
        self.separator = separator
        self.chunk_size = chunk_size

    @classmethod
    def from_config(cls, cfg: CfgNode, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
        """Pass the model's tokenizer (``model.tokenizer``); without one, the config's is built."""
        return {
            "tokenizer": tokenizer or build_tokenizer(cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER),
            "max_query_len": cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN,
            "separator": cfg.DATASETS.SEPARATOR,
            "chunk_size": cfg.TEST.PROMPT_CHUNK_SIZE or None,
        }

    def check_vocabulary(
        self, names: Sequence[str] | Mapping[int, str], keep_repeats: bool = False
    ) -> list[tuple[Hashable, str]]:
        """The vocabulary's (label, name) pairs, without repeats unless ``keep_repeats``, every name
        checked against this builder's token limit (see ``prompts.check_vocabulary``): call it where a
        vocabulary enters, so a bad name is reported before any prompt of it is needed."""
        items = tuple(vocabulary_items(names))
        return list(_checked_vocabulary(items, self.tokenizer, self.max_query_len, keep_repeats))

    def categories(self, names: Sequence[str] | Mapping[int, str], keep_repeats: bool = False) -> list[Prompt]:
        """A vocabulary as detection prompts: one per chunk that fits the token limit (labels are the
        list indices or the mapping's keys); every category lands in exactly one prompt, except a
        repeated name, which is prompted once, under its first label.

        ``keep_repeats`` is for a dataset's categories: every one is scored by its evaluation, so
        every one keeps its own name in its own chunk slot, as the official GLIP evaluation prompts
        them (LVIS v1 has five names that read the same after cleaning, "bow" twice among them;
        dropping them would leave those categories without boxes and shift every later chunk)."""
        kept = dict(self.check_vocabulary(names, keep_repeats))
        chunks = chunk_categories(kept, self.tokenizer, self.max_query_len, self.chunk_size, self.separator)
        prompts = []
        for chunk in chunks:
            caption, spans = build_labeled_prompt(chunk, self.separator)
            prompts.append(self.encode(caption, spans, label_names=dict(chunk), names_categories=True))
        return prompts

    def caption(
        self, caption: str, phrases: Sequence[str] | None = None, spans: Sequence | None = None
    ) -> Prompt:
        """A free-form caption whose phrases (labels 0, 1, ...) are given as text or character spans;
        with neither, the whole caption is the one phrase. Too long a caption is an error."""
        located = locate_phrases(caption, phrases=phrases, spans=spans)
        # One token more than allowed reveals an overflow without tokenizing twice.
        tokenized = tokenize_prompts(self.tokenizer, caption, self.max_query_len + 1, warn_truncation=False)
        if len(tokenized["input_ids"][0]) > self.max_query_len:
            raise ValueError(
                f"caption exceeds the {self.max_query_len}-token limit: {caption[:80]!r}...; shorten it or "
                "pass its phrases as a category list, which is chunked"
            )
        return self.encode(
            caption,
            {label: phrase_spans for label, (_, phrase_spans) in enumerate(located)},
            label_names={label: text for label, (text, _) in enumerate(located)},
            tokenized=tokenized,
        )

    def sample_detection(
        self,
        positive_labels: Iterable[Hashable],
        all_names: Mapping[int, str],
        rng: random.Random,
        *,
        max_negatives: int,
        full_negatives_prob: float,
        shuffle: bool,
    ) -> tuple[Prompt, list[int]]:
        """Training prompt of a detection image (see ``sample_detection_prompt``)."""
        return sample_detection_prompt(
            positive_labels, all_names, self.tokenizer, self.max_query_len, max_negatives, rng,
            shuffle=shuffle, separator=self.separator, full_negatives_prob=full_negatives_prob,
        )

    def tokenize(self, caption: str) -> BatchEncoding:
        """A caption's tokens with offsets, truncated to the limit (training captions may be longer)."""
        return tokenize_prompts(self.tokenizer, caption, self.max_query_len)

    def encode(
        self,
        caption: str,
        spans_per_label: Mapping[int, Sequence[Sequence[int]]],
        *,
        label_names: Mapping[int, str] | None = None,
        names_categories: bool = False,
        tokenized: BatchEncoding | None = None,
    ) -> Prompt:
        """``encode_prompt`` with this builder's tokenizer and limit."""
        return encode_prompt(
            self.tokenizer, caption, spans_per_label, self.max_query_len,
            label_names=label_names, names_categories=names_categories, tokenized=tokenized,
        )
