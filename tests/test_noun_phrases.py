"""Captions grounded without listing phrases: spaCy's noun chunks become the phrases, with
adjectives kept, conjunctions split, repeated phrases merged into one label and punctuation trimmed."""

import pytest

from glipv2_d2.data import noun_phrases
from glipv2_d2.data.noun_phrases import NounPhraseModelMissing, noun_phrase_spans
from glipv2_d2.data.prompt_builder import PromptBuilder
from glipv2_d2.modeling.language.tokenizer import build_tokenizer


def phrase_texts(caption: str) -> list[list[str]]:
    return [[caption[start:end] for start, end in spans] for spans in noun_phrase_spans(caption)]


def test_adjectives_stay_in_their_phrase():
    assert phrase_texts("the man with a red hat throws a frisbee to his dog") == [
        ["the man"], ["a red hat"], ["a frisbee"], ["his dog"]]


def test_conjunctions_split_phrases_and_punctuation_is_trimmed():
    caption = "cats and dogs; birds (flying) over trees..."
    assert phrase_texts(caption) == [["cats"], ["dogs"], ["birds"], ["trees"]]


def test_a_repeated_phrase_is_one_label_with_every_occurrence():
    caption = "a dog, a cat and a dog."
    assert noun_phrase_spans(caption) == [[(0, 5), (17, 22)], [(7, 12)]]


def test_pronouns_and_captions_without_nouns_give_no_phrase():
    assert noun_phrase_spans("It is raining.") == []
    assert noun_phrase_spans("hello!") == []


def test_extracted_spans_ground_every_phrase_in_the_prompt():
    caption = "A small brown dog sits next to a white cat, and the white cat sleeps."
    spans = noun_phrase_spans(caption)
    prompt = PromptBuilder(build_tokenizer("minilm")).caption(caption, spans=spans)
    assert prompt.label_names == {0: "A small brown dog", 1: "a white cat", 2: "the white cat"}
    tokens = [prompt.input_ids[prompt.label_to_tokens[label]].tolist() for label in range(3)]
    assert [len(t) for t in tokens] == [4, 3, 3]  # every word of each phrase, nothing else
    assert tokens[1][1:] == tokens[2][1:]  # "white cat" twice: same words, other determiner


def test_a_missing_model_says_how_to_install_it(monkeypatch):
    noun_phrases._english_pipeline.cache_clear()
    monkeypatch.setattr(noun_phrases, "SPACY_MODELS", ("no_such_spacy_model",))
    with pytest.raises(NounPhraseModelMissing, match="requirements-web.txt"):
        noun_phrase_spans("a dog")
    noun_phrases._english_pipeline.cache_clear()
