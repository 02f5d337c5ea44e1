"""Image-text fusion: bidirectional attention, DyConv and the stacked VL-DyHead tower."""

from .bi_attention import BiAttentionBlock, BiMultiHeadAttention
from .dyconv import Conv3x3Norm, DyConv, DyReLU, HSigmoid, ModulatedDeformConv
from .vl_dyhead import VLDyHeadLayer, VLDyHeadTower, text_attention_mask

__all__ = [
    "BiAttentionBlock",
    "BiMultiHeadAttention",
    "Conv3x3Norm",
    "DyConv",
    "DyReLU",
    "HSigmoid",
    "ModulatedDeformConv",
    "VLDyHeadLayer",
    "VLDyHeadTower",
    "text_attention_mask",
]
