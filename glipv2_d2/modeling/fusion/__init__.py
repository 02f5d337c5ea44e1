"""Image-text fusion: bidirectional attention, DyConv and the stacked VL-DyHead tower."""

from .bi_attention import BiAttentionBlock, BiMultiHeadAttention
from .build import FUSION_REGISTRY, build_fusion
from .clip_text_tower import ClipFusionTextLayer, VLDyHeadTowerClipText
from .dyconv import Conv3x3Norm, DyConv, DyReLU, HSigmoid, ModulatedDeformConv
from .vl_dyhead import VLDyHeadLayer, VLDyHeadTower, text_attention_mask

__all__ = [
    "BiAttentionBlock",
    "BiMultiHeadAttention",
    "ClipFusionTextLayer",
    "FUSION_REGISTRY",
    "Conv3x3Norm",
    "DyConv",
    "DyReLU",
    "HSigmoid",
    "ModulatedDeformConv",
    "VLDyHeadLayer",
    "VLDyHeadTower",
    "VLDyHeadTowerClipText",
    "build_fusion",
    "text_attention_mask",
]
