"""Anchors of GLIP's ATSS head (official ``anchor_generator.py``, ``make_anchor_generator_complex``).

Detectron2's ``DefaultAnchorGenerator`` is not used: it centres anchors at ``(0, 0)`` (or at
``offset * stride``) with extent ``x2 - x1 = size``, while the official anchors follow the legacy
"+1" convention -- a cell of stride ``s`` has its anchor centred at ``((s - 1) / 2, (s - 1) / 2)``
and ``x2 - x1 + 1 = size`` (e.g. ``[-28, -28, 35, 35]`` at stride 8, size 64). Both the ATSS
assignment and the released box regressors were trained against these exact coordinates.
"""

from collections.abc import Sequence

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

__all__ = ["LegacyAnchorGenerator", "legacy_cell_anchors"]


def legacy_cell_anchors(stride: int, sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Anchors ``(len(aspect_ratios) * len(sizes), 4)`` of the cell at the origin, ratio-major.

    Reproduces the Faster R-CNN recipe: start from the ``stride x stride`` reference window, pick
    integer (rounded, ties to even) width/height per aspect ratio (``h / w``), then scale by
    ``size / stride`` around the window centre. Computed in float64, returned in float32.
    """
    f64 = torch.float64
    center = (stride - 1) / 2.0
    ratios = torch.as_tensor(aspect_ratios, dtype=f64)
    scales = torch.as_tensor(sizes, dtype=f64) / stride
    ratio_w = torch.round(torch.sqrt(stride * stride / ratios))
    ratio_h = torch.round(ratio_w * ratios)
    ws = (ratio_w[:, None] * scales[None, :]).reshape(-1)
    hs = (ratio_h[:, None] * scales[None, :]).reshape(-1)
    half_w, half_h = 0.5 * (ws - 1), 0.5 * (hs - 1)
    anchors = torch.stack((center - half_w, center - half_h, center + half_w, center + half_h), dim=1)
    return anchors.float()


class LegacyAnchorGenerator(nn.Module):
    """One anchor set per FPN level, shifted over the level's grid in row-major (``y * W + x``) order.

    Level ``i`` uses ``sizes[i] * octave ** (j / scales_per_octave)`` for ``j < scales_per_octave``
    and every aspect ratio. The per-level cell anchors are buffers ``cell_anchors.{i}`` of shape
    ``(A, 4)`` so that a checkpoint converter can compare them with the official
    ``rpn.anchor_generator.cell_anchors.{i}``. They are not persistent: they follow from the
    constructor arguments, so checkpoints neither carry nor need them.
    """

    @configurable
    def __init__(
        self,
        sizes: Sequence[float] = (64, 128, 256, 512, 1024),
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        aspect_ratios: Sequence[float] = (1.0,),
        scales_per_octave: int = 1,
        octave: float = 2.0,
    ) -> None:
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"need one anchor size per stride, got sizes={sizes} strides={strides}")
        if scales_per_octave < 1:
            raise ValueError(f"scales_per_octave must be >= 1, got {scales_per_octave}")
        self.strides = tuple(int(s) for s in strides)
        cells = nn.Module()
        for i, (size, stride) in enumerate(zip(sizes, self.strides, strict=True)):
            level_sizes = [size * octave ** (j / scales_per_octave) for j in range(scales_per_octave)]
            cell = legacy_cell_anchors(stride, level_sizes, aspect_ratios)
            cells.register_buffer(str(i), cell, persistent=False)
        self.cell_anchors = cells

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Sequence[ShapeSpec]) -> dict:
        """Strides are the feature levels' own (``input_shape``, finest first), so they cannot
        disagree with the backbone; MODEL.ATSS gives sizes, aspect ratios and scales per octave."""
        atss = cfg.MODEL.ATSS
        if len(atss.ANCHOR_SIZES) != len(input_shape):
            raise ValueError(
                f"MODEL.ATSS.ANCHOR_SIZES has {len(atss.ANCHOR_SIZES)} sizes {list(atss.ANCHOR_SIZES)} for the "
                f"{len(input_shape)} feature levels of strides {[shape.stride for shape in input_shape]}"
            )
        return {
            "sizes": atss.ANCHOR_SIZES,
            "strides": [shape.stride for shape in input_shape],
            "aspect_ratios": atss.ASPECT_RATIOS,
            "scales_per_octave": atss.SCALES_PER_OCTAVE,
        }

    @property
    def num_anchors_per_location(self) -> list[int]:
        return [len(cell) for cell in self.cell_anchors.buffers()]

    def grid_anchors(self, grid_sizes: Sequence[Sequence[int]]) -> list[Tensor]:
        """Per level, ``(H * W * A, 4)`` anchors ordered by location then cell anchor."""
        anchors = []
        for (height, width), stride, cell in zip(
            grid_sizes, self.strides, self.cell_anchors.buffers(), strict=True
        ):
            shifts_x = torch.arange(width, dtype=torch.float32, device=cell.device) * stride
            shifts_y = torch.arange(height, dtype=torch.float32, device=cell.device) * stride
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
            anchors.append((shifts + cell[None]).reshape(-1, 4))
        return anchors

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Anchors for feature maps ``(B, C, H, W)``, finest level first; shared by all images."""
        return self.grid_anchors([f.shape[-2:] for f in features])
