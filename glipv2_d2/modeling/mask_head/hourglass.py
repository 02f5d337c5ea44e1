"""GLIP's hourglass mask feature extractor (official ``HourglassFPNFeatureExtractor``).

Parameter names follow the official checkpoint (``mask_hg1.up1.conv1.weight``, ...), so
``roi_heads.mask.feature_extractor.*`` loads by prefix alone.
"""

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .pooler import LegacyLevelROIPooler

__all__ = ["Hourglass", "HourglassFeatureExtractor", "HourglassResidual"]


def _conv3x3(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Conv2d:
    """3x3 conv keeping the size, initialised as GLIP's convs (Kaiming normal fan-out, zero bias)."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return conv


class HourglassResidual(nn.Module):
    """Pre-activation residual: ``x + conv3(relu(conv2(relu(conv1(relu(x))))))``.

    All three convs are 3x3 and the middle one is dilated by 3: GLIP passes 1, 3, 1 where the
    classic hourglass has kernel sizes, and its helper reads them as dilations.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _conv3x3(channels, channels // 2)
        self.conv2 = _conv3x3(channels // 2, channels // 2, dilation=3)
        self.conv3 = _conv3x3(channels // 2, channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(x))
        out = self.conv2(F.relu(out))
        return x + self.conv3(F.relu(out))


class Hourglass(nn.Module):
    """``up1(x) + upsample2(low3(low2(low1(maxpool2(x)))))``; ``low2`` recurses ``depth - 1`` times."""

    def __init__(self, depth: int, channels: int):
        super().__init__()
        self.up1 = HourglassResidual(channels)
        self.low1 = HourglassResidual(channels)
        self.low2 = Hourglass(depth - 1, channels) if depth > 1 else HourglassResidual(channels)
        self.low3 = HourglassResidual(channels)

    def forward(self, x: Tensor) -> Tensor:
        low = self.low3(self.low2(self.low1(F.max_pool2d(x, 2, 2))))
        return self.up1(x) + F.interpolate(low, scale_factor=2.0, mode="nearest")


class HourglassFeatureExtractor(nn.Module):
    """Pooled box features through hourglass blocks ``mask_hg1``, ``mask_hg2``, ... each followed by
    a ReLU; ``(sum n_i, C, R, R)`` out for per-image boxes in."""

    def __init__(self, pooler: LegacyLevelROIPooler, channels: Sequence[int], depth: int):
        super().__init__()
        self.pooler = pooler
        self.num_blocks = len(channels)
        for index, width in enumerate(channels, 1):
            self.add_module(f"mask_hg{index}", Hourglass(depth, width))

    def forward(self, features: Sequence[Tensor], boxes: Sequence[Tensor]) -> Tensor:
        x = self.pooler(features, boxes)
        for index in range(1, self.num_blocks + 1):
            x = F.relu(getattr(self, f"mask_hg{index}")(x))
        return x
