"""LVIS "fixed AP" (Dave et al. 2021, "Evaluating Large-Vocabulary Object Detectors: The Devil is
in the Details"), the LVIS protocol GLIP and MDETR report.

Standard LVIS AP keeps the 300 best detections of each image, so a detector's AP depends on how it
spreads that budget over 1203 categories (and improves by merely reshuffling scores across
categories). Fixed AP drops the per-image cap and keeps instead the 10,000 best detections of each
category over the whole split, then runs the usual LVIS evaluation with no per-image limit.

The protocol covers masks as well as boxes: the authors' reference script
(achalddave/large-vocab-devil, scripts/evaluate_ap_fixed.py) evaluates "segm" by default and
"bbox" on request, with the same per-category cut. LVISFixedAPEvaluator does both, as its tasks say
(the trainer passes ("bbox", "segm") with MODEL.MASK_ON): the cut keeps whole detections, so a
mask is kept exactly when its box is.
"""

import types
from collections.abc import Iterator
from contextlib import contextmanager

import lvis.eval
import numpy as np
from detectron2.evaluation import LVISEvaluator

__all__ = ["LVISFixedAPEvaluator", "NumpyCompatibleLVISEvaluator", "keep_top_per_category", "lvis_numpy_float_alias"]


class _NumpyWithFloatAlias(types.ModuleType):
    """NumPy plus the `np.float` alias that NumPy 1.24 removed."""

    float = float

    def __getattr__(self, name: str) -> object:
        return getattr(np, name)


@contextmanager
def lvis_numpy_float_alias() -> Iterator[None]:
    """Lend lvis.eval the `np.float` alias while the block runs, then restore its NumPy.

    lvis 0.5.3, the latest release, accumulates AP with np.float, so on NumPy >= 1.24 every LVIS
    evaluation (Detectron2's LVISEvaluator included) fails without it; patching lvis.eval only for
    the evaluations this project runs leaves the module as it was for everyone else.
    """
    original = lvis.eval.np
    if hasattr(original, "float"):
        yield
        return
    lvis.eval.np = _NumpyWithFloatAlias("numpy")
    try:
        yield
    finally:
        lvis.eval.np = original


class NumpyCompatibleLVISEvaluator(LVISEvaluator):
    """Detectron2's LVISEvaluator, running lvis-api under ``lvis_numpy_float_alias``."""

    def _eval_predictions(self, predictions: list[dict]) -> None:
        with lvis_numpy_float_alias():
            super()._eval_predictions(predictions)


def keep_top_per_category(predictions: list[dict], k: int) -> list[dict]:
    """LVISEvaluator's per-image predictions, keeping only each category's k best-scoring
    detections over all the images given; ties at the cut go to the earlier image."""
    flat = [(p, d) for p, pred in enumerate(predictions) for d in pred.get("instances", ())]
    scores = np.array([d["score"] for _, d in flat], dtype=np.float64)
    categories = np.array([d["category_id"] for _, d in flat], dtype=np.int64)
    order = np.lexsort((-scores, categories))  # by category, then score descending; stable
    sorted_categories = categories[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_categories, sorted_categories)
    kept = np.zeros(len(flat), dtype=bool)
    kept[order[rank < k]] = True
    per_image: list[list[dict]] = [[] for _ in predictions]
    for (p, detection), keep in zip(flat, kept):
        if keep:
            per_image[p].append(detection)
    return [
        {**pred, "instances": kept_here} if "instances" in pred else pred
        for pred, kept_here in zip(predictions, per_image)
    ]


class LVISFixedAPEvaluator(NumpyCompatibleLVISEvaluator):
    """Detectron2's LVISEvaluator with the fixed-AP protocol: the top `topk_per_category`
    detections of each category over the split, evaluated with no per-image cap.

    The evaluator only cuts per category; for the protocol to hold the model must not cut per image
    either, so raise MODEL.ATSS.DETECTIONS_PER_IMG with it (GLIP evaluates fixed AP with 300,
    and prompts of 40 categories, TEST.PROMPT_CHUNK_SIZE 40). Predictions are cut on each rank
    before being gathered (a rank's top k of a category holds its share of the global top k), and
    again on the main process. lvis-api's Params.max_dets only names the AR metric and never limits
    detections, so passing max_dets -1 to LVISResults is the whole of "max_dets=-1".
    """

    def __init__(
        self,
        dataset_name: str,
        topk_per_category: int = 10_000,
        tasks: tuple[str, ...] = ("bbox",),
        distributed: bool = True,
        output_dir: str | None = None,
    ):
        super().__init__(dataset_name, tasks, distributed, output_dir, max_dets_per_image=-1)
        self._topk_per_category = topk_per_category

    def evaluate(self) -> dict | None:
        self._predictions = keep_top_per_category(self._predictions, self._topk_per_category)
        return super().evaluate()

    def _eval_predictions(self, predictions: list[dict]) -> None:
        super()._eval_predictions(keep_top_per_category(predictions, self._topk_per_category))
