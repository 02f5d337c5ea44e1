"""Registry of image-text fusion modules, so that another fusion design is a config change
(MODEL.GLIPV2.FUSION) rather than an edit of the meta-architecture."""

from collections.abc import Sequence

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from torch import nn

__all__ = ["FUSION_REGISTRY", "build_fusion"]

FUSION_REGISTRY = Registry("GLIPV2_FUSION")
FUSION_REGISTRY.__doc__ = """Image-text fusion (EncVL). A registered class is called as
``cls(cfg, input_shape, lang_config)`` with the backbone's levels (finest first) and the text encoder's
config. Its ``forward(features, lang_hidden, lang_mask)`` returns (fused levels, fused text) and its
``output_shape(input_shape)`` the fused levels' shapes."""


def build_fusion(cfg: CfgNode, input_shape: Sequence[ShapeSpec], lang_config) -> nn.Module:
    """The fusion module named by cfg.MODEL.GLIPV2.FUSION."""
    return FUSION_REGISTRY.get(cfg.MODEL.GLIPV2.FUSION)(cfg, input_shape, lang_config)
