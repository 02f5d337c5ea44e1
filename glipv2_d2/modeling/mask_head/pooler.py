"""ROIAlign of detected boxes from the pyramid level GLIP's rule picks.

Detectron2's ``ROIPooler`` is not used on purpose: it assigns levels from box areas without
maskrcnn_benchmark's "+1" and with eps 1e-8, so a box whose side is near 224 * 2^k lands one level
lower than in GLIP (a 223.5-pixel box: P3 there, P4 officially). The sampling itself is
Detectron2's ``ROIAlign`` with ``aligned=False``, which calls the same torchvision kernel GLIP does.
"""

import math
from collections.abc import Sequence

import torch
from detectron2.layers import ROIAlign
from torch import Tensor, nn

__all__ = ["LegacyLevelROIPooler", "assign_legacy_levels", "boxes_to_rois"]

CANONICAL_BOX_SIZE = 224  # a box of this +1 side is pooled from CANONICAL_LEVEL
CANONICAL_LEVEL = 4
LEVEL_EPS = 1e-6


def assign_legacy_levels(boxes: Tensor, min_level: int, max_level: int) -> Tensor:
    """Index (0 = ``min_level``) of the level each ``(N, 4)`` xyxy box is pooled from.

    ``floor(4 + log2(sqrt((x2 - x1 + 1) * (y2 - y1 + 1)) / 224 + 1e-6))``, clamped to the levels.
    """
    widths = boxes[:, 2] - boxes[:, 0] + 1
    heights = boxes[:, 3] - boxes[:, 1] + 1
    sizes = torch.sqrt(widths * heights)
    levels = torch.floor(CANONICAL_LEVEL + torch.log2(sizes / CANONICAL_BOX_SIZE + LEVEL_EPS))
    return levels.clamp(min=min_level, max=max_level).to(torch.int64) - min_level


def boxes_to_rois(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image ``(n_i, 4)`` boxes -> ``(sum n_i, 5)`` rows ``[image index, x1, y1, x2, y2]``."""
    rows = [
        torch.cat((torch.full_like(image_boxes[:, :1], index), image_boxes), dim=1)
        for index, image_boxes in enumerate(boxes)
    ]
    return torch.cat(rows, dim=0)


class LegacyLevelROIPooler(nn.Module):
    """``(sum n_i, C, R, R)`` features of per-image boxes, each from its GLIP level, in box order."""

    def __init__(self, strides: Sequence[int], resolution: int, sampling_ratio: int):
        super().__init__()
        self.min_level = int(math.log2(strides[0]))
        self.max_level = self.min_level + len(strides) - 1
        if list(strides) != [2**level for level in range(self.min_level, self.max_level + 1)]:
            raise ValueError(f"the mask pooler needs consecutive power-of-two level strides, got {list(strides)}")
        self.resolution = resolution
        self.align = nn.ModuleList(
            ROIAlign((resolution, resolution), 1.0 / stride, sampling_ratio, aligned=False) for stride in strides
        )

    def forward(self, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.align):
            raise ValueError(f"the mask pooler was built for {len(self.align)} levels, got {len(features)}")
        rois = boxes_to_rois(boxes).to(features[0].dtype)
        levels = assign_legacy_levels(rois[:, 1:], self.min_level, self.max_level)
        pooled = features[0].new_zeros((len(rois), features[0].shape[1], self.resolution, self.resolution))
        for index, (level_features, align) in enumerate(zip(features, self.align)):
            in_level = torch.nonzero(levels == index).squeeze(1)
            if len(in_level):
                pooled[in_level] = align(level_features, rois[in_level])
        return pooled
