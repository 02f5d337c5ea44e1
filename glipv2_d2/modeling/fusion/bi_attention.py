"""Bidirectional image-text attention ("MHA-B") with the numerics of official GLIP.

Parameter names match ``BiAttentionBlockForCheckpoint`` / ``BiMultiHeadAttention`` in
microsoft/GLIP ``maskrcnn_benchmark/utils/fuse_helper.py`` so official weights load by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import stochastic_depth

__all__ = ["BiMultiHeadAttention", "BiAttentionBlock", "ImageKeys"]

LOGIT_CLAMP = 50000.0
PAD_FILL = -9e15


@dataclass
class ImageKeys:
    """What the text branch reads of the image: the scaled image queries and the image values,
    ``(B, heads, N, head_dim)`` each. In caption mode they do not depend on the text, so decoding
    computes them once per image."""

    query: Tensor
    value: Tensor

    def index_select(self, index: Tensor) -> ImageKeys:
        """The rows ``index`` of the batch (beams reordered or repeated)."""
        return ImageKeys(self.query.index_select(0, index), self.value.index_select(0, index))


class BiMultiHeadAttention(nn.Module):
    """Image->text and text->image attention sharing one score matrix.

    Queries come from the image side and keys from the text side; the text side reuses the
    transposed scores. Scores are clamped to +-50000 as official GLIP does (it keeps fp16 finite
    and trained weights saw it). Fused SDPA is not used: it cannot apply the clamp, and two SDPA
    calls would compute the score matrix twice.

    The official text-side softmax first subtracts the row max and clamps again at -50000; both
    are no-ops for a softmax evaluated in fp32 (softmax subtracts the same max internally, and
    anything 50000 below the max underflows to exactly 0 either way), so they are folded away.
    Scores and softmaxes run in fp32 under autocast, as CUDA autocast does for the official code.
    """

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, num_heads: int, dropout: float = 0.1):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout

        self.v_proj = nn.Linear(v_dim, embed_dim)
        self.l_proj = nn.Linear(l_dim, embed_dim)
        self.values_v_proj = nn.Linear(v_dim, embed_dim)
        self.values_l_proj = nn.Linear(l_dim, embed_dim)
        self.out_v_proj = nn.Linear(embed_dim, v_dim)
        self.out_l_proj = nn.Linear(embed_dim, l_dim)
        for proj in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj,
                     self.out_v_proj, self.out_l_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge_heads(self, x: Tensor) -> Tensor:
        b, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)

    def forward(self, v: Tensor, lang: Tensor, lang_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """v: (B, N, v_dim) image tokens; lang: (B, T, l_dim); lang_mask: (B, T), 0 = padding.

        Returns the updates (delta_v (B, N, v_dim), delta_l (B, T, l_dim)).
        """
        query = self._split_heads(self.v_proj(v) * self.scale)
        key = self._split_heads(self.l_proj(lang))
        value_v = self._split_heads(self.values_v_proj(v))
        value_l = self._split_heads(self.values_l_proj(lang))

        scores = torch.matmul(query, key.transpose(-1, -2)).float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        # Text side: each token attends over all image positions (no image padding mask, as official).
        attn_l = scores.softmax(dim=-2)
        if lang_mask is not None:
            # Official adds the int mask with zeros replaced by -9e15, so valid tokens get +1.
            mask_term = torch.where(lang_mask.to(scores.device) != 0, 1.0, PAD_FILL).to(scores.dtype)
            scores = scores + mask_term[:, None, None, :]
        attn_v = scores.softmax(dim=-1)

        attn_v = F.dropout(attn_v, p=self.dropout, training=self.training).to(value_l.dtype)
        attn_l = F.dropout(attn_l, p=self.dropout, training=self.training).to(value_v.dtype)
        out_v = torch.matmul(attn_v, value_l)
        out_l = torch.matmul(attn_l.transpose(-1, -2), value_v)
        return self.out_v_proj(self._merge_heads(out_v)), self.out_l_proj(self._merge_heads(out_l))

    def image_keys(self, v: Tensor) -> ImageKeys:
        """The image side of the text branch for (B, N, v_dim) image tokens (caption mode)."""
        return ImageKeys(self._split_heads(self.v_proj(v) * self.scale), self._split_heads(self.values_v_proj(v)))

    def text_from_image(self, lang: Tensor, image: ImageKeys) -> Tensor:
        """delta_l (B, T, l_dim) of the text branch alone (caption mode): each token's softmax runs
        over the image positions only, so a token never reads another token here and the branch is
        causal as it stands; any number of tokens (one per decoding step) gives the same rows."""
        key = self._split_heads(self.l_proj(lang))
        scores = torch.matmul(image.query, key.transpose(-1, -2)).float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        attn_l = F.dropout(scores.softmax(dim=-2), p=self.dropout, training=self.training).to(image.value.dtype)
        return self.out_l_proj(self._merge_heads(torch.matmul(attn_l.transpose(-1, -2), image.value)))


class BiAttentionBlock(nn.Module):
    """Pre-LN bidirectional attention over all pyramid levels at once, with layer scale.

    As in official GLIP the residual is added to the layer-normalised inputs:
    ``v = LN(v) + gamma_v * dv`` and ``l = LN(l) + gamma_l * dl``.
    """

    def __init__(
        self,
        v_dim: int,
        l_dim: int,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.1,
        drop_path: float = 0.0,
        init_values: float = 1e-4,
    ):
        super().__init__()
        self.layer_norm_v = nn.LayerNorm(v_dim)
        self.layer_norm_l = nn.LayerNorm(l_dim)
        self.attn = BiMultiHeadAttention(v_dim, l_dim, embed_dim, num_heads, dropout=dropout)
        self.drop_path = drop_path
        self.gamma_v = nn.Parameter(torch.full((v_dim,), float(init_values)))
        self.gamma_l = nn.Parameter(torch.full((l_dim,), float(init_values)))

    def forward(
        self, visual_levels: list[Tensor], lang_hidden: Tensor, lang_mask: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """visual_levels: list of (B, C, H, W); lang_hidden: (B, T, l_dim); lang_mask: (B, T)."""
        sizes = [tuple(f.shape[-2:]) for f in visual_levels]
        v = torch.cat([f.flatten(2) for f in visual_levels], dim=2).transpose(1, 2)
        v = self.layer_norm_v(v)
        lang = self.layer_norm_l(lang_hidden)
        delta_v, delta_l = self.attn(v, lang, lang_mask)
        v = v + stochastic_depth(self.gamma_v * delta_v, self.drop_path, "row", self.training)
        lang = lang + stochastic_depth(self.gamma_l * delta_l, self.drop_path, "row", self.training)

        b, _, c = v.shape
        v = v.transpose(1, 2).contiguous()
        chunks = v.split([h * w for h, w in sizes], dim=2)
        levels = [chunk.view(b, c, h, w) for chunk, (h, w) in zip(chunks, sizes, strict=True)]
        return levels, lang

    def image_side(self, visual_levels: list[Tensor]) -> tuple[list[Tensor], ImageKeys]:
        """Caption mode's image path: the image does not attend to the text, so it keeps its
        layer-normalised input (the residual without the text update) and hands the text branch
        its keys; nothing here depends on the text."""
        sizes = [tuple(f.shape[-2:]) for f in visual_levels]
        v = self.layer_norm_v(torch.cat([f.flatten(2) for f in visual_levels], dim=2).transpose(1, 2))
        keys = self.attn.image_keys(v)
        b, _, c = v.shape
        chunks = v.transpose(1, 2).contiguous().split([h * w for h, w in sizes], dim=2)
        return [chunk.view(b, c, h, w) for chunk, (h, w) in zip(chunks, sizes, strict=True)], keys

    def text_side(self, lang_hidden: Tensor, image: ImageKeys) -> Tensor:
        """Caption mode's text path: ``l = LN(l) + gamma_l * dl`` with dl read from ``image``."""
        lang = self.layer_norm_l(lang_hidden)
        delta_l = self.attn.text_from_image(lang, image)
        return lang + stochastic_depth(self.gamma_l * delta_l, self.drop_path, "row", self.training)
