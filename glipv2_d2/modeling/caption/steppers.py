"""One decoding step of the caption model: the fused text state of each sequence's newest token.

``CachedCaptionStepper`` is the fast path: in caption mode the image never reads the text, so the
backbone and every fusion layer's visual path (bi-attention image side, DyConv) run ONCE per image,
and each step feeds only the newest token through the BERT encoder and the tower's text layers,
whose keys and values of earlier tokens sit in transformers ``DynamicCache``s (the text branch's
image keys and values come from the image side). ``RecomputingCaptionStepper`` runs the whole
caption-mode network on the whole sequence at every step: the reference the cached path must equal,
and the baseline of ``tools/benchmark.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from detectron2.structures import ImageList
from torch import Tensor
from transformers import DynamicCache

from ..fusion.vl_dyhead import CaptionImageSide

if TYPE_CHECKING:
    from ..meta_arch import GLIPv2

__all__ = ["CachedCaptionStepper", "CaptionStepper", "RecomputingCaptionStepper", "encode_image_side"]


def encode_image_side(model: GLIPv2, images: ImageList) -> CaptionImageSide:
    """Backbone and the fusion tower's image side: everything of the image caption mode needs."""
    pyramid = model.backbone(images.tensor)
    return model.fusion.encode_image([pyramid[name] for name in model.level_names])


class CaptionStepper:
    """Decoding state over rows that each caption one of the batch's images (beams repeat them).

    ``start(rows)`` begins empty sequences for images ``rows``; ``step(tokens)`` takes every row's
    whole sequence so far (N, L), the newest token last, and returns its fused text state (N, D);
    ``reorder(index)`` keeps rows ``index`` (the surviving beams), in that order.
    """

    image: CaptionImageSide  # the batch's image side (one row per image), for grounding

    def __init__(self, model: GLIPv2, images: ImageList):
        self.model = model
        self.images = images
        self.rows = torch.arange(len(images), device=images.tensor.device)

    @property
    def num_images(self) -> int:
        return len(self.images)

    def start(self, rows: Tensor) -> None:
        raise NotImplementedError

    def step(self, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def reorder(self, index: Tensor) -> None:
        raise NotImplementedError


class CachedCaptionStepper(CaptionStepper):
    """The image side once, then one token per step through cached text layers."""

    def __init__(self, model: GLIPv2, images: ImageList):
        super().__init__(model, images)
        self.image = encode_image_side(model, images)
        self.start(self.rows)

    def start(self, rows: Tensor) -> None:
        self.rows = rows
        self.row_image = self.image.index_select(rows)
        self.encoder_cache, self.tower_cache = DynamicCache(), DynamicCache()

    def step(self, tokens: Tensor) -> Tensor:
        mask = torch.ones_like(tokens)
        newest = tokens[:, -1:]
        hidden = self.model.language_backbone(newest, mask, causal=True, cache=self.encoder_cache)["hidden"]
        return self.model.fusion.decode_text(hidden, mask, self.row_image, cache=self.tower_cache)[:, -1]

    def reorder(self, index: Tensor) -> None:
        rows = self.rows[index]
        if not torch.equal(rows, self.rows):  # beams of one image share its image side
            self.row_image = self.image.index_select(rows)
        self.rows = rows
        self.encoder_cache.reorder_cache(index)
        self.tower_cache.reorder_cache(index)


class RecomputingCaptionStepper(CaptionStepper):
    """The whole caption-mode network (backbone, tower, head) on the whole sequence at every step."""

    def __init__(self, model: GLIPv2, images: ImageList):
        super().__init__(model, images)
        self.image = encode_image_side(model, images)

    def start(self, rows: Tensor) -> None:
        self.rows = rows

    def step(self, tokens: Tensor) -> Tensor:
        mask = torch.ones_like(tokens)
        hidden = self.model.language_backbone(tokens, mask, causal=True)["hidden"]
        pyramid = self.model.backbone(self.images.tensor[self.rows])
        levels = [pyramid[name] for name in self.model.level_names]
        features, fused_text = self.model.fusion(levels, hidden, mask, caption_mode=True)
        self.model.head(features, fused_text)  # the region-word head, as a full forward pass runs it
        return fused_text[:, -1]

    def reorder(self, index: Tensor) -> None:
        self.rows = self.rows[index]
