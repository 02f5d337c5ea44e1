"""The VL-DyHead tower of a CLIP-type text encoder (GLIPv2-B / -H).

With ``MODEL_TYPE "clip"`` the official tower (``vldyhead.py``) puts a ``CLIPTransformerLayer`` where
GLIP-T has a ``BertEncoderLayer``: one more pre-LN CLIP block (QuickGELU, LayerNorm eps 1e-12) over
the fused text, attending to every real token (padding masked, not causal). Its parameter names
(``attn.in_proj_weight``, ``ln_1``, ``mlp.c_fc`` ...) sit below ``layers[i].text_layer`` as the BERT
layer's do, so official checkpoints map through the same tower rule.
"""

from __future__ import annotations

import torch
from detectron2.config import configurable
from torch import Tensor
from transformers import BertConfig

from ..language.clip_text import ClipResidualBlock, ClipTextConfig, padding_attention_mask
from .build import FUSION_REGISTRY
from .vl_dyhead import VLDyHeadTower

__all__ = ["ClipFusionTextLayer", "VLDyHeadTowerClipText"]


class ClipFusionTextLayer(ClipResidualBlock):
    """The CLIP block as a fusion text layer: called like the tower's BERT layers, with their
    (B, 1, 1, T) key mask (boolean "attend", or additive with large negatives on padding)."""

    def forward(self, hidden: Tensor, text_mask: Tensor) -> Tensor:
        keep = text_mask if text_mask.dtype == torch.bool else text_mask == 0
        mask = padding_attention_mask(keep[:, 0, 0, :].long(), self.heads, hidden.dtype)
        return super().forward(hidden, attn_mask=mask)


@FUSION_REGISTRY.register()
class VLDyHeadTowerClipText(VLDyHeadTower):
    """``VLDyHeadTower`` whose text layers are ``ClipFusionTextLayer`` of the text encoder's width and
    heads. The parent builds BERT layers of that width, which are replaced here: the parent has no
    way to be handed another text layer."""

    @configurable
    def __init__(self, *, lang_config: ClipTextConfig, **kwargs):
        if not isinstance(lang_config, ClipTextConfig):
            raise TypeError(
                "MODEL.GLIPV2.FUSION VLDyHeadTowerClipText needs the CLIP-type text encoder "
                f"(MODEL.LANGUAGE_BACKBONE.NAME build_clip_language_backbone), got a {type(lang_config).__name__}"
            )
        width, heads = lang_config.width, lang_config.heads
        stand_in = BertConfig(hidden_size=width, num_attention_heads=heads, intermediate_size=4 * width)
        super().__init__(lang_config=stand_in, **kwargs)
        for layer in self.layers:
            if layer.text_layer is not None:
                layer.text_layer = ClipFusionTextLayer(width, heads)
