"""Caption metrics against values computed by hand, the Java-free path, and the baseline."""

import math

import pytest

from glipv2_d2.evaluation.captioning import CaptionEvaluator, most_frequent_caption, python_ptb_tokenize


@pytest.fixture()
def evaluator():
    return CaptionEvaluator(use_java=False)


def test_bleu1_of_one_sentence_is_clipped_precision_times_the_brevity_penalty(evaluator):
    scores = evaluator.score({1: ["a red circle above a blue square"]}, {1: "A red circle."})
    # 3 of 3 hypothesis words match; hypothesis 3 words, reference 7: BP = exp(1 - 7/3)
    assert scores["Bleu_1"] == pytest.approx(100 * math.exp(1 - 7 / 3), abs=1e-6)


def test_cider_of_two_images_follows_the_cider_d_formula(evaluator):
    # n-gram idf = log(2 images / images whose references hold it): "a" -> 0, the rest log 2.
    # Image 1 ("a red square" vs "a red circle"): n=1 cosine 1/2 ("red" shared), n=2 1/2 ("a red"),
    # n=3, n=4 none; CIDEr-D = 10 * mean over n = 2.5. Image 2 equals its reference on n = 1..3, has
    # no 4-gram: 10 * 3/4 = 7.5. Mean 5.0, reported x100.
    scores = evaluator.score({1: ["a red circle"], 2: ["a blue square"]}, {1: "a red square", 2: "a blue square"})
    assert scores["CIDEr"] == pytest.approx(500.0, abs=1e-6)


def test_without_java_the_results_say_so_and_skip_meteor_and_spice():
    evaluator = CaptionEvaluator(use_java=False, use_spice=True)
    evaluator.reset()
    evaluator.process([{"image_id": 1, "captions": ["a red circle"]}], [{"caption": "a red circle"}])
    results = evaluator.evaluate()["caption"]
    assert results["java_runtime"] == 0.0
    assert "METEOR" not in results and "SPICE" not in results
    assert results["Bleu_3"] == pytest.approx(100.0, abs=1e-4) and results["ROUGE_L"] == pytest.approx(100.0)


def test_the_baseline_caption_is_scored_by_the_same_metrics():
    evaluator = CaptionEvaluator(baseline_caption="a red circle", use_java=False)
    evaluator.process([{"image_id": 1, "captions": ["a red circle"]}, {"image_id": 2, "captions": ["a blue square"]}],
                      [{"caption": "a red circle"}, {"caption": "a blue square"}])
    results = evaluator.evaluate()
    assert results["caption"]["Bleu_1"] == pytest.approx(100.0, abs=1e-4)
    assert results["caption_baseline"]["Bleu_1"] == pytest.approx(200 / 3, abs=1e-4)  # "a" of image 2 matches
    assert results["caption_baseline"]["CIDEr"] < results["caption"]["CIDEr"]


def test_an_input_without_references_is_refused():
    with pytest.raises(ValueError, match="no reference 'captions'"):
        CaptionEvaluator(use_java=False).process([{"image_id": 3}], [{"caption": "a"}])


@pytest.mark.parametrize(
    "caption,tokens",
    [
        ("A man, riding a horse.", "a man riding a horse"),
        ("The dog's ball isn't red!", "the dog 's ball is n't red"),
        ("two cats -- sleeping...", "two cats sleeping"),
        ("a t-shirt on 3.5 chairs", "a t-shirt on 3.5 chairs"),
    ],
)
def test_python_tokenization_matches_the_ptb_tokenizer_on_plain_captions(caption, tokens):
    assert python_ptb_tokenize(caption) == tokens


def test_the_most_frequent_caption_counts_tokenized_captions():
    assert most_frequent_caption(["A cat.", "a dog", "a cat", "a dog.", "a cat!"]) == "a cat"
    with pytest.raises(ValueError):
        most_frequent_caption([])
