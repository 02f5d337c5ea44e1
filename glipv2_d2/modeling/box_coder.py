"""The box coder of GLIP's ATSS head (official ``vldyhead.py`` ``BoxCoder``).

It keeps maskrcnn_benchmark's legacy pixel convention: a box ``[x1, x2]`` covers ``x2 - x1 + 1``
pixels and its centre is ``(x1 + x2) / 2``. Detectron2's ``Box2BoxTransform`` measures widths as
``x2 - x1``, which changes both the regression targets and every decoded box size against the
released weights; that is why this module exists instead of a configured ``Box2BoxTransform``.
"""

import math
from collections.abc import Sequence

import torch
from detectron2.config import CfgNode, configurable
from torch import Tensor

__all__ = ["LegacyBoxCoder"]


class LegacyBoxCoder:
    """Encode boxes as (dx, dy, dw, dh) deltas w.r.t. anchors and decode them back.

    Boxes and anchors are absolute ``x1, y1, x2, y2``. Any leading dimensions are allowed as long as
    the anchors broadcast against the boxes; ``decode`` also accepts ``4 * k`` delta columns (k
    boxes per anchor), as the official coder does.
    """

    @configurable
    def __init__(
        self,
        weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        scale_clamp: float = math.log(1000.0 / 16),
        pixel_offset: float = 1.0,
    ) -> None:
        if len(weights) != 4:
            raise ValueError(f"weights must have 4 values (wx, wy, ww, wh), got {weights}")
        self.weights = tuple(float(w) for w in weights)
        # Upper bound on dw, dh before exp(); the official coder has no lower bound.
        self.scale_clamp = float(scale_clamp)
        # 1 for the legacy "+1" width convention, 0 for the modern one.
        self.pixel_offset = float(pixel_offset)

    def _size_and_center(self, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        widths = boxes[..., 2] - boxes[..., 0] + self.pixel_offset
        heights = boxes[..., 3] - boxes[..., 1] + self.pixel_offset
        ctr_x = (boxes[..., 2] + boxes[..., 0]) / 2
        ctr_y = (boxes[..., 3] + boxes[..., 1]) / 2
        return widths, heights, ctr_x, ctr_y

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        return {"weights": tuple(cfg.MODEL.ATSS.BBOX_REG_WEIGHTS), "scale_clamp": cfg.MODEL.ATSS.BBOX_XFORM_CLIP}

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Deltas ``(..., 4)`` that turn ``anchors`` into ``boxes`` (no clamp, as the official coder)."""
        dtype = _compute_dtype(boxes, anchors)
        gw, gh, gx, gy = self._size_and_center(boxes.to(dtype))
        aw, ah, ax, ay = self._size_and_center(anchors.to(dtype))
        wx, wy, ww, wh = self.weights
        return torch.stack(
            (
                wx * (gx - ax) / aw,
                wy * (gy - ay) / ah,
                ww * torch.log(gw / aw),
                wh * torch.log(gh / ah),
            ),
            dim=-1,
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes ``(..., 4k)`` from deltas ``(..., 4k)`` and anchors ``(..., 4)``.

        Computed in at least float32: the official coder casts the anchors to the deltas' dtype,
        which under bf16/fp16 autocast would round pixel coordinates of large images by whole pixels.
        """
        dtype = _compute_dtype(deltas, anchors)
        deltas = deltas.to(dtype)
        grouped = deltas.reshape(*deltas.shape[:-1], deltas.shape[-1] // 4, 4)
        widths, heights, ctr_x, ctr_y = (t[..., None] for t in self._size_and_center(anchors.to(dtype)))
        wx, wy, ww, wh = self.weights
        dx = grouped[..., 0] / wx
        dy = grouped[..., 1] / wy
        dw = (grouped[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (grouped[..., 3] / wh).clamp(max=self.scale_clamp)

        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths - self.pixel_offset)
        half_h = 0.5 * (torch.exp(dh) * heights - self.pixel_offset)
        boxes = torch.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=-1
        )
        return boxes.reshape(deltas.shape)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
