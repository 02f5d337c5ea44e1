"""Training targets and loss of the language-guided mask head (official ``MaskRCNNLossComputation``
with ``vl_version``).

A proposal matched to a GT box (IoU with "+1" areas >= 0.5, no low-quality matches) is positive
when that GT's phrase has tokens; its target is the GT mask cropped to the proposal at 28x28, and
its logit the mean over the phrase's tokens. The loss is BCE-with-logits averaged over every pixel
of every positive (computed by the head).
"""

from dataclasses import dataclass

import numpy as np
import torch
from detectron2.modeling.matcher import Matcher
from detectron2.structures import BitMasks, Boxes, PolygonMasks, pairwise_iou
from detectron2.structures.masks import polygons_to_bitmask
from torch import Tensor

from .tokens import positive_token_weights

__all__ = ["MaskTargets", "build_mask_targets", "crop_mask_targets", "legacy_pairwise_iou"]


def legacy_pairwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU with maskrcnn_benchmark's areas ``(x2 - x1 + 1) * (y2 - y1 + 1)``: adding 1 to ``x2, y2``
    turns Detectron2's areas and intersections into the legacy ones."""
    def plus_one(boxes: Tensor) -> Boxes:
        return Boxes(torch.cat((boxes[:, :2], boxes[:, 2:] + 1), dim=1))

    return pairwise_iou(plus_one(boxes1), plus_one(boxes2))


def _rasterize_polygons_in_box(polygons: list[np.ndarray], box: np.ndarray, mask_size: int) -> np.ndarray:
    """One instance's polygons shifted to the box, scaled by ``M / max(side, 1)`` and rasterised
    with pycocotools (parts merged). Detectron2's ``rasterize_polygons_within_box`` divides by
    ``max(side, 0.1)`` instead, so boxes under one pixel wide would get other targets."""
    x1, y1, x2, y2 = box.astype(np.float64)
    scale_x, scale_y = mask_size / max(x2 - x1, 1.0), mask_size / max(y2 - y1, 1.0)
    scaled = []
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64).copy()
        points[0::2] = (points[0::2] - x1) * scale_x
        points[1::2] = (points[1::2] - y1) * scale_y
        scaled.append(points)
    return polygons_to_bitmask(scaled, mask_size, mask_size)


def crop_mask_targets(gt_masks: PolygonMasks | BitMasks, boxes: Tensor, mask_size: int) -> Tensor:
    """``(N, M, M)`` float 0/1 targets: GT mask ``i`` cropped to ``boxes[i]`` and resized.

    Polygons are rasterised as GLIP does; bit masks (e.g. decoded RLE) are resampled with
    Detectron2's ``BitMasks.crop_and_resize`` (which GLIP cannot do: it only takes polygons).
    """
    if len(gt_masks) != len(boxes):
        raise ValueError(f"{len(gt_masks)} GT masks for {len(boxes)} boxes")
    if len(boxes) == 0:
        return boxes.new_zeros((0, mask_size, mask_size))
    if isinstance(gt_masks, PolygonMasks):
        cpu_boxes = boxes.detach().cpu().double().numpy()
        targets = [_rasterize_polygons_in_box(p, b, mask_size) for p, b in zip(gt_masks.polygons, cpu_boxes)]
        return torch.from_numpy(np.stack(targets)).to(device=boxes.device, dtype=torch.float32)
    if isinstance(gt_masks, BitMasks):
        return gt_masks.crop_and_resize(boxes.detach().float(), mask_size).to(boxes.device, torch.float32)
    raise TypeError(f"GT masks must be PolygonMasks or BitMasks, got {type(gt_masks).__name__}")


@dataclass
class MaskTargets:
    """What one image's proposals learn from: match, phrase size, and the positives' targets."""

    matched_idxs: Tensor  # (N,) GT index of each proposal, -1 when unmatched
    token_counts: Tensor  # (N,) positive tokens of the matched GT's phrase (0 when unmatched)
    positive_inds: Tensor  # (P,) proposals with a matched phrase of at least one token
    token_weights: Tensor  # (P, T) averaging each positive's phrase tokens
    targets: Tensor  # (P, M, M) float 0/1


def build_mask_targets(
    proposals: Tensor,
    gt_boxes: Tensor,
    gt_masks: PolygonMasks | BitMasks,
    positive_map: Tensor,
    matcher: Matcher,
    mask_size: int,
) -> MaskTargets:
    """Targets of one image's ``(N, 4)`` proposals from its GTs (boxes, masks, ``(G, T)`` map)."""
    if not (len(gt_boxes) == len(gt_masks) == len(positive_map)):
        raise ValueError(
            f"{len(gt_boxes)} GT boxes, {len(gt_masks)} GT masks and {len(positive_map)} positive-map rows"
        )
    matched_idxs, match_labels = matcher(legacy_pairwise_iou(gt_boxes, proposals))
    matched_idxs = torch.where(match_labels == 1, matched_idxs, torch.full_like(matched_idxs, -1))
    # A trailing zero count is what index -1 (unmatched) reads.
    counts = torch.cat(((positive_map > 0).sum(dim=1), positive_map.new_zeros(1, dtype=torch.int64)))
    token_counts = counts[matched_idxs]
    positive_inds = torch.nonzero(token_counts > 0).squeeze(1)
    matched = matched_idxs[positive_inds]
    return MaskTargets(
        matched_idxs=matched_idxs,
        token_counts=token_counts,
        positive_inds=positive_inds,
        token_weights=positive_token_weights(positive_map[matched]),
        targets=crop_mask_targets(gt_masks[matched.cpu()], proposals[positive_inds], mask_size),
    )

