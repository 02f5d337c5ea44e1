"""VQA accuracy and answer normalisation against hand-computed values of the official rules."""

import pytest

from glipv2_d2.evaluation.vqa import VQAEvaluator, majority_answer_per_type, question_answer_of_record
from glipv2_d2.evaluation.vqa_normalization import (
    normalize_answer,
    normalize_ground_truth,
    normalize_punctuation,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("two", "2"),
        ("Ten", "10"),
        ("none", "0"),
        ("a dog", "dog"),
        ("The Red Ball", "red ball"),
        ("an apple a day", "apple day"),
        ("dont", "don\u2019t"),  # the official table writes the typographic apostrophe
        ("weve", "we've"),  # ... except in a few entries
        ("don't", "don t"),  # an apostrophe inside a word becomes a space
        ("1,000", "1000"),  # a comma between digits: every mark is deleted, not spaced
        ("1,000 (approx)", "1000 approx"),
        ("red,blue", "red blue"),
        ("red, blue", "red blue"),  # touches a space: deleted
        ("yes.", "yes"),  # trailing period
        ("3.5", "3.5"),  # a period before a digit stays
        ("3.", "3"),
        ("left/right", "left right"),
        ("  yes\t", "yes"),
        ("two dogs", "2 dogs"),
        ("wait!", "wait!"),  # "!" is not in the official punctuation list
    ],
)
def test_normalize_answer_follows_the_official_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_only_32_periods_are_stripped_as_the_official_script_does():
    assert normalize_punctuation("." * 40) == "." * 8


def test_ground_truth_gets_punctuation_only_and_only_when_annotators_disagree():
    assert normalize_ground_truth(["two", "two"]) == ["two", "two"]  # unanimous: untouched
    assert normalize_ground_truth(["yes.", "yes"]) == ["yes", "yes"]
    assert normalize_ground_truth(["Two", "2"]) == ["Two", "2"]  # no lower case, no digits for ground truth


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("2", ["2"] * 10, 1.0),
        ("two", ["2"] * 10, 1.0),
        ("3", ["2"] * 10, 0.0),
        # 2 matches: leaving out a matching annotator leaves 1 (1/3), else 2 (2/3): (2/3 + 16/3) / 10
        ("2", ["2", "2", "3"] + ["4"] * 7, 0.6),
        # 3 matches: (3 * 2/3 + 7 * 1) / 10
        ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),
        # 4 matches: every subset keeps >= 3
        ("yes", ["yes"] * 4 + ["no"] * 6, 1.0),
        # 1 match: (1 * 0 + 9 * 1/3) / 10
        ("cat", ["cat"] + ["dog"] * 9, 0.3),
        # ground truth with a period is stripped only because annotators disagree
        ("dog", ["dog.", "dog", "dog"] + ["cat"] * 7, 0.9),
    ],
)
def test_accuracy_averages_min_matches_over_3_over_leave_one_out_subsets(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_accuracy_needs_ground_truth():
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])


def _record(qid, answers, qtype, atype="other"):
    return {"question_id": qid, "answers": answers, "question_type": qtype, "answer_type": atype}


def test_majority_answer_per_type_normalises_and_breaks_ties_alphabetically():
    records = [
        _record(1, ["two"] * 10, "how many", "number"),
        _record(2, ["2"] * 10, "how many", "number"),
        _record(3, ["3"] * 10, "how many", "number"),
        _record(4, ["yes"] * 10, "is there", "yes/no"),
        _record(5, ["no"] * 10, "is there", "yes/no"),
        {**_record(6, ["red"] * 6 + ["blue"] * 4, ""), "multiple_choice_answer": "Blue"},
    ]
    assert question_answer_of_record(records[5]) == "blue"
    assert majority_answer_per_type(records) == {"how many": "2", "is there": "no", "unknown": "blue"}


def test_evaluator_reports_accuracy_per_type_and_the_baseline_on_the_same_questions():
    inputs = [
        _record(1, ["2"] * 10, "how many", "number"),
        _record(2, ["yes"] * 3 + ["no"] * 7, "is there", "yes/no"),
        _record(3, ["red"] * 10, "what colour"),
    ]
    outputs = [{"vqa": {"answer": "two"}}, {"vqa": {"answer": "yes"}}, {"vqa": {"answer": "blue"}}]
    evaluator = VQAEvaluator({"how many": "1", "is there": "no", "what colour": "red"})
    evaluator.reset()
    evaluator.process(inputs, outputs)
    results = evaluator.evaluate()["vqa"]
    assert results["accuracy"] == pytest.approx(100 * (1.0 + 0.9 + 0.0) / 3)
    assert results["baseline_accuracy"] == pytest.approx(100 * (0.0 + 1.0 + 1.0) / 3)
    assert results["accuracy/is there"] == pytest.approx(90.0)
    assert results["answer_type/other"] == pytest.approx(0.0)
    assert results["num_questions"] == 3


def test_evaluator_names_a_model_without_the_vqa_head():
    evaluator = VQAEvaluator()
    with pytest.raises(ValueError, match="VQAHead"):
        evaluator.process([_record(1, ["2"], "how many")], [{"instances": None}])
