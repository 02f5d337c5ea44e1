"""ATSS anchor assignment (Zhang et al., 2020) as GLIP trains it (official ``ATSSLossComputation``).

Detectron2 has no ATSS matcher, and the released weights were trained with the legacy "+1" IoU,
the per-level centre-distance candidates and the mean + unbiased-std threshold reproduced here.
"""

import torch
from torch import Tensor

__all__ = ["atss_assign", "legacy_pairwise_iou"]

# Centre-inside margin of the official assigner, in pixels.
_INSIDE_MARGIN = 0.01


def legacy_pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU ``(M, N)`` with maskrcnn_benchmark's "+1" widths and heights (``boxlist_iou``).

    The union is floored at a tiny positive value so that degenerate boxes (area <= 0) give a
    finite IoU instead of NaN; for valid boxes the union is >= 1 and nothing changes.
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0] + 1) * (boxes1[:, 3] - boxes1[:, 1] + 1)
    area2 = (boxes2[:, 2] - boxes2[:, 0] + 1) * (boxes2[:, 3] - boxes2[:, 1] + 1)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def _centers(boxes: Tensor) -> Tensor:
    return torch.stack(((boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2), dim=1)


def _candidates(anchor_centers: Tensor, gt_centers: Tensor, level_sizes: list[int], topk: int) -> Tensor:
    """Indices ``(K, N)`` into the concatenated anchors: per level the ``min(topk, A_l)`` anchors
    whose centres are nearest each GT centre (Euclidean distance, as the official code)."""
    distances = (anchor_centers[:, None, :] - gt_centers[None, :, :]).pow(2).sum(-1).sqrt()
    candidates, start = [], 0
    for per_level in distances.split(level_sizes, dim=0):
        k = min(topk, per_level.shape[0])
        candidates.append(per_level.topk(k, dim=0, largest=False).indices + start)
        start += per_level.shape[0]
    return torch.cat(candidates, dim=0)


def _iou_thresholds(candidate_ious: Tensor) -> Tensor:
    """Per-GT threshold mean + unbiased std of the candidates' IoUs.

    With a single candidate the unbiased std is undefined; it is taken as 0 there (the official
    code would produce NaN and no positive at all).
    """
    if candidate_ious.shape[0] < 2:
        return candidate_ious.mean(0)
    return candidate_ious.mean(0) + candidate_ious.std(0, correction=1)


@torch.no_grad()
def atss_assign(anchors_per_level: list[Tensor], gt_boxes: Tensor, topk: int = 9) -> tuple[Tensor, Tensor]:
    """Assign each anchor of one image to a GT box or to the background.

    Args:
        anchors_per_level: ``(A_l, 4)`` anchors ``x1, y1, x2, y2`` per level, finest first.
        gt_boxes: ``(N, 4)`` GT boxes ``x1, y1, x2, y2``; ``N`` may be 0.
        topk: candidates per level and GT (the official ``ATSS.TOPK`` times anchors per location).

    Returns:
        ``matched_gt`` ``(A,)`` int64, the GT index of each anchor of the concatenated levels or
        -1 for a negative, and ``matched_iou`` ``(A,)``, the IoU with that GT (0 for negatives).
        Among several GTs an anchor is positive for, the one with the highest IoU wins.
    """
    anchors = torch.cat(anchors_per_level, dim=0)
    num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
    if num_gt == 0 or num_anchors == 0:
        return (
            torch.full((num_anchors,), -1, dtype=torch.long, device=anchors.device),
            anchors.new_zeros(num_anchors),
        )
    gt_boxes = gt_boxes.to(anchors.dtype)
    ious = legacy_pairwise_iou(anchors, gt_boxes)
    anchor_centers = _centers(anchors)
    level_sizes = [a.shape[0] for a in anchors_per_level]
    candidates = _candidates(anchor_centers, _centers(gt_boxes), level_sizes, topk)

    candidate_ious = ious.gather(0, candidates)
    is_pos = candidate_ious >= _iou_thresholds(candidate_ious)[None, :]
    cand_x, cand_y = anchor_centers[candidates, 0], anchor_centers[candidates, 1]
    margins = torch.stack(
        (cand_x - gt_boxes[:, 0], cand_y - gt_boxes[:, 1], gt_boxes[:, 2] - cand_x, gt_boxes[:, 3] - cand_y),
        dim=0,
    )
    is_pos &= margins.min(dim=0).values > _INSIDE_MARGIN

    # Candidate indices are distinct within a column (levels are disjoint, top-k picks distinct
    # rows), so scattering the positives' IoUs into a -inf matrix is unambiguous.
    positive_ious = torch.full_like(ious, float("-inf"))
    positive_ious.scatter_(0, candidates, torch.where(is_pos, candidate_ious, float("-inf")))
    best_iou, best_gt = positive_ious.max(dim=1)
    is_matched = best_iou > float("-inf")
    matched_gt = torch.where(is_matched, best_gt, torch.full_like(best_gt, -1))
    return matched_gt, torch.where(is_matched, best_iou, torch.zeros_like(best_iou))
