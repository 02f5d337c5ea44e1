"""Image-text fusion: bidirectional attention, DyConv and the stacked VL-DyHead tower."""

from .bi_attention import BiAttentionBlock, BiMultiHeadAttention
from .build import FUSION_REGISTRY, build_fusion
from .dyconv import Conv3x3Norm, DyConv, DyReLU, HSigmoid, ModulatedDeformConv
from .vl_dyhead import VLDyHeadLayer, VLDyHeadTower, text_attention_mask

__all__ = [
    "BiAttentionBlock",
    "BiMultiHeadAttention",
    "FUSION_REGISTRY",
    "Conv3x3Norm",
    "DyConv",
    "DyReLU",
    "HSigmoid",
    "ModulatedDeformConv",
    "VLDyHeadLayer",
    "VLDyHeadTower",
    "build_fusion",
    "text_attention_mask",
]
