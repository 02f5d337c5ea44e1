"""Prediction layers of GLIP's VL-DyHead: region-word logits, box regression and centerness.

Parameter names match the official ``VLDyHead`` (checkpoint prefix ``rpn.head.``) so that released
weights load without renaming. The official head also builds ``cls_logits``, an 80-way classifier
that GLIP never uses; it is left out here (see ``OFFICIAL_UNUSED_KEYS``).
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

__all__ = ["OFFICIAL_UNUSED_KEYS", "GroundingPredictionHead", "Scale"]

# Keys of the official head's state dict that this head deliberately does not hold.
OFFICIAL_UNUSED_KEYS = ("cls_logits.weight", "cls_logits.bias")


class Scale(nn.Module):
    """A learnable scalar multiplier (``maskrcnn_benchmark.layers.Scale``); Detectron2 has none."""

    def __init__(self, init_value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(init_value)]))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class GroundingPredictionHead(nn.Module):
    """Per-anchor outputs on the fused features (one anchor per location, as in GLIP).

    The region-word logit of anchor ``a`` and token ``t`` is
    ``x_a . proj_t / exp(log_scale) + bias_t``, where ``x_a`` is the raw (not normalised) visual
    feature, ``proj_t = W (e_t / 2) + b`` with ``e_t`` the L2-normalised text feature, and
    ``bias_t = e_t . bias_lang + bias0``. Logits are clamped to ``+-logit_clamp`` as the official
    code does to keep fp16 finite.
    """

    @configurable
    def __init__(
        self,
        in_channels: int = 256,
        lang_dim: int = 768,
        num_levels: int = 5,
        prior_prob: float = 0.01,
        log_scale_init: float = 0.0,
        logit_clamp: float = 50000.0,
    ) -> None:
        super().__init__()
        self.logit_clamp = float(logit_clamp)
        self.bbox_pred = nn.Conv2d(in_channels, 4, kernel_size=1)
        self.centerness = nn.Conv2d(in_channels, 1, kernel_size=1)
        # Keeps PyTorch's default Linear init, as the official head does.
        self.dot_product_projection_text = nn.Linear(lang_dim, in_channels)
        self.log_scale = nn.Parameter(torch.tensor([float(log_scale_init)]))
        self.bias_lang = nn.Parameter(torch.zeros(lang_dim))
        # Focal-loss prior: every token starts with probability prior_prob.
        self.bias0 = nn.Parameter(torch.tensor([-math.log((1 - prior_prob) / prior_prob)]))
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for conv in (self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.constant_(conv.bias, 0.0)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Sequence[ShapeSpec], lang_dim: int) -> dict:
        """A head over the fused levels ``input_shape`` (one shared width) scoring text of width ``lang_dim``."""
        widths = {shape.channels for shape in input_shape}
        if len(widths) != 1:
            raise ValueError(f"the grounding head shares its convs across levels; got widths {sorted(widths)}")
        return {
            "in_channels": widths.pop(),
            "lang_dim": lang_dim,
            "num_levels": len(input_shape),
            "prior_prob": cfg.MODEL.DYHEAD.PRIOR_PROB,
            "log_scale_init": cfg.MODEL.DYHEAD.LOG_SCALE_INIT,
        }

    def project_tokens(self, lang_hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Projected tokens ``(B, T, C)`` and per-token bias ``(B, T)`` from text features ``(B, T, D)``."""
        embedding = F.normalize(lang_hidden, p=2, dim=-1)
        proj_tokens = self.dot_product_projection_text(embedding / 2.0)
        token_bias = torch.matmul(embedding, self.bias_lang) + self.bias0
        return proj_tokens, token_bias

    def region_word_logits(
        self, features: Sequence[Tensor], proj_tokens: Tensor, token_bias: Tensor
    ) -> Tensor:
        """Logits ``(B, sum_l H_l * W_l, T)`` of all levels, concatenated in level order, ``y * W + x``."""
        flat = torch.cat([f.flatten(2) for f in features], dim=2).transpose(1, 2)
        logits = (
            torch.matmul(flat, proj_tokens.transpose(1, 2)) / self.log_scale.exp() + token_bias[:, None, :]
        )
        return logits.clamp(min=-self.logit_clamp, max=self.logit_clamp)

    def forward(self, features: Sequence[Tensor], lang_hidden: Tensor) -> dict[str, list[Tensor] | Tensor]:
        """Head outputs for feature maps ``(B, C, H, W)`` (finest first) and text ``(B, T, D)``.

        Returns a dict with per-level lists ``"logits"`` ``(B, H*W, T)``, ``"bbox_reg"``
        ``(B, 4, H, W)`` (already multiplied by the level's scale) and ``"centerness"``
        ``(B, 1, H, W)`` logits, plus ``"proj_tokens"`` ``(B, T, C)`` and ``"token_bias"`` ``(B, T)``.
        """
        if len(features) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} feature levels, got {len(features)}")
        proj_tokens, token_bias = self.project_tokens(lang_hidden)
        logits = self.region_word_logits(features, proj_tokens, token_bias)
        level_sizes = [f.shape[-2] * f.shape[-1] for f in features]
        return {
            "logits": list(logits.split(level_sizes, dim=1)),
            "bbox_reg": [scale(self.bbox_pred(f)) for f, scale in zip(features, self.scales, strict=True)],
            "centerness": [self.centerness(f) for f in features],
            "proj_tokens": proj_tokens,
            "token_bias": token_bias,
        }
