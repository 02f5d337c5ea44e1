"""Grounded captioning at inference (paper app. D.2): every generated word gets the box whose
region representation has the highest dot product with it.

The dot product is the region-word logit of the grounding head (fused region feature . projected
fused word state, its temperature and bias), taken for every anchor of every level; a word of
several word pieces, or a phrase of several words, scores each anchor by the mean logit of its
tokens. The anchor's regressed box is the word's box, its sigmoid the score.

Phrases: captions come without a parser (NLTK's tagger data cannot be fetched offline, see
``glipv2_d2/data/prompts.py``), so a phrase is a maximal run of words that are not function words
(``FUNCTION_WORDS``: articles, prepositions, conjunctions, pronouns, auxiliaries) or punctuation:
"a red circle above two blue squares" -> "red circle", "two blue squares". Per-word boxes are
always returned as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

__all__ = ["FUNCTION_WORDS", "CaptionWord", "GroundedSpan", "caption_words", "content_phrases", "ground_groups"]

FUNCTION_WORDS = frozenset(
    "a an the this that these those some its their his her of on in at to from with without by for into onto "
    "over under above below behind beside near next and or but while as is are was were be being been it they "
    "he she there here which who whose what where has have had do does".split()
)


@dataclass
class CaptionWord:
    """A word of the caption: its text, character span in the caption and token positions
    (1-based: position 0 is [CLS])."""

    text: str
    span: tuple[int, int]
    positions: list[int]


@dataclass
class GroundedSpan:
    """A word or phrase with its box (x1, y1, x2, y2, output pixels) and region-word probability."""

    text: str
    span: tuple[int, int]
    box: list[float]
    score: float


def caption_words(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> tuple[str, list[CaptionWord]]:
    """The caption text and its words from generated word pieces ("##" pieces join the word before;
    punctuation attaches to the word before without a space)."""
    groups: list[tuple[str, list[int]]] = []
    for position, piece in enumerate(tokenizer.convert_ids_to_tokens(token_ids), start=1):
        if piece.startswith("##") and groups:
            text, positions = groups[-1]
            groups[-1] = (text + piece[2:], positions + [position])
        else:
            groups.append((piece, [position]))
    caption, words = "", []
    for text, positions in groups:
        if caption and not _is_punctuation(text):
            caption += " "
        words.append(CaptionWord(text, (len(caption), len(caption) + len(text)), positions))
        caption += text
    return caption, words


def content_phrases(words: list[CaptionWord]) -> list[list[CaptionWord]]:
    """Maximal runs of words that are neither function words nor punctuation (module docstring)."""
    phrases: list[list[CaptionWord]] = []
    current: list[CaptionWord] = []
    for word in words:
        if word.text.lower() in FUNCTION_WORDS or _is_punctuation(word.text):
            if current:
                phrases.append(current)
            current = []
        else:
            current.append(word)
    if current:
        phrases.append(current)
    return phrases


def ground_groups(logits: Tensor, boxes: Tensor, groups: list[list[int]]) -> tuple[Tensor, Tensor]:
    """For token-position groups, the box (G, 4) of the anchor with the highest mean logit over the
    group's tokens, and its sigmoid (G,). ``logits`` (anchors, T), ``boxes`` (anchors, 4)."""
    if not groups:
        return boxes.new_zeros(0, 4), logits.new_zeros(0)
    weights = torch.zeros(logits.shape[1], len(groups), device=logits.device)
    for column, positions in enumerate(groups):
        weights[positions, column] = 1.0 / len(positions)
    best, anchor = (logits.float() @ weights).max(dim=0)
    return boxes[anchor], best.sigmoid()


def _is_punctuation(text: str) -> bool:
    return not any(ch.isalnum() for ch in text)
