"""VQA accuracy as a Detectron2 evaluator, and the majority-answer baseline it is read next to.

Each question scores ``vqa_accuracy`` (the official rules, see ``vqa_normalization``); the split's
accuracy is the mean over questions, in percent. Per question type and answer type the same mean
is reported over their questions (the official script averages the accuracy of only the last
leave-one-out subset there; here every type's number is the mean of full per-question accuracies).
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from .vqa_normalization import normalize_answer, vqa_accuracy

__all__ = ["VQAEvaluator", "majority_answer_per_type", "question_answer_of_record"]

logger = logging.getLogger(__name__)

NO_TYPE = "unknown"


def question_answer_of_record(record: Mapping) -> str:
    """The answer most annotators of a record gave ("multiple_choice_answer" when the record has
    it, as VQAv2's annotations do), normalised like a prediction."""
    if record.get("multiple_choice_answer"):
        return normalize_answer(record["multiple_choice_answer"])
    counts = Counter(normalize_answer(answer) for answer in record["answers"])
    return min(counts, key=lambda answer: (-counts[answer], answer))


def majority_answer_per_type(records: Iterable[Mapping]) -> dict[str, str]:
    """The trivial baseline: for each question type the most frequent answer of the (training)
    records, ties broken alphabetically; records without a type share ``NO_TYPE``."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        counts[record.get("question_type") or NO_TYPE][question_answer_of_record(record)] += 1
    return {qtype: min(c, key=lambda answer: (-c[answer], answer)) for qtype, c in counts.items()}


class VQAEvaluator(DatasetEvaluator):
    """Accuracy of the model's ``output["vqa"]["answer"]`` against each input's "answers" (raw
    annotator answers), grouped by "question_type" / "answer_type" when the inputs have them.

    With ``baseline_answers`` (question type -> answer, see ``majority_answer_per_type``) the
    baseline's accuracy on the same questions is reported too. Results, in percent:
    ``{"vqa": {"accuracy", "baseline_accuracy", "accuracy/<question type>", "answer_type/<type>",
    "num_questions"}}``.
    """

    def __init__(self, baseline_answers: Mapping[str, str] | None = None, result_key: str = "vqa"):
        self.baseline_answers = dict(baseline_answers) if baseline_answers is not None else None
        self.result_key = result_key
        self._rows: list[tuple[str, str, float, float | None]] = []

    def reset(self) -> None:
        self._rows = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for x, output in zip(inputs, outputs, strict=True):
            if "answers" not in x:
                raise ValueError(f"VQA evaluation: question {x.get('question_id')!r} has no ground-truth 'answers'")
            if "vqa" not in output:
                raise ValueError("VQA evaluation: the model returned no 'vqa' output; name VQAHead in "
                                 "MODEL.GLIPV2.TASK_HEADS")
            qtype = x.get("question_type") or NO_TYPE
            accuracy = vqa_accuracy(output["vqa"]["answer"], x["answers"])
            baseline = None
            if self.baseline_answers is not None:
                baseline = vqa_accuracy(self.baseline_answers.get(qtype, ""), x["answers"])
            self._rows.append((qtype, x.get("answer_type") or NO_TYPE, accuracy, baseline))

    def evaluate(self) -> dict:
        rows = list(itertools.chain(*comm.gather(self._rows, dst=0)))
        if not comm.is_main_process():
            return {}
        if not rows:
            logger.warning("VQA evaluation saw no question")
            return {self.result_key: {"num_questions": 0}}
        results = {"accuracy": _percent(row[2] for row in rows), "num_questions": len(rows)}
        if self.baseline_answers is not None:
            results["baseline_accuracy"] = _percent(row[3] for row in rows)
        for index, prefix in ((0, "accuracy"), (1, "answer_type")):
            groups: dict[str, list[float]] = defaultdict(list)
            for row in rows:
                groups[row[index]].append(row[2])
            results.update({f"{prefix}/{name}": _percent(values) for name, values in sorted(groups.items())})
        logger.info("VQA accuracy %.2f%% over %d questions%s", results["accuracy"], len(rows),
                    f" (majority-answer baseline {results['baseline_accuracy']:.2f}%)"
                    if "baseline_accuracy" in results else "")
        return {self.result_key: results}


def _percent(values: Iterable[float]) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values)
