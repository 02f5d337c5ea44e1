"""Which detections a user sees: a score threshold and at most k boxes per phrase, so that one
frequent phrase cannot crowd the picture and the table."""

from __future__ import annotations

import torch
from detectron2.structures import Instances

__all__ = ["select_detections"]


def select_detections(instances: Instances, score_threshold: float = 0.0, top_k_per_phrase: int = 0) -> Instances:
    """Detections scoring at least ``score_threshold``, the best ``top_k_per_phrase`` of each label
    (0: all), in descending score order."""
    kept = _take(instances, (instances.scores >= score_threshold).nonzero().flatten())
    order = torch.argsort(kept.scores, descending=True, stable=True)
    if top_k_per_phrase > 0:
        labels = kept.pred_classes[order]
        rank_in_label = torch.zeros_like(order)
        for label in labels.unique():
            positions = (labels == label).nonzero().flatten()
            rank_in_label[positions] = torch.arange(len(positions))
        order = order[rank_in_label < top_k_per_phrase]
    return _take(kept, order)


def _take(instances: Instances, index: torch.Tensor) -> Instances:
    """Instances at these indices. A numpy index, because numpy reads a one-element tensor as a
    scalar and would turn the phrase array of a single detection into a string."""
    return instances[index.cpu().numpy()]
