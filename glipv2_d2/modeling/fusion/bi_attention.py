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

        Returns the updates (delta_v (B, N, v_dim), delta_l (B, T, l_dim)), computed by whichever
        of the two equal orders of the products costs fewer multiply-adds for this prompt length.
        """
        if self.folded_is_cheaper(v.shape[-1], lang.shape[1]):
            return self.attend_folded(v, lang, lang_mask)
        return self.attend_projected(v, lang, lang_mask)

    def folded_is_cheaper(self, v_dim: int, num_tokens: int) -> bool:
        """Per image position the projected order costs ``3 E (v_dim + T)`` multiply-adds (three
        E-wide projections of the image side, three E x T products), the folded one ``3 v_dim H T``."""
        embed_dim = self.num_heads * self.head_dim
        return v_dim * self.num_heads * num_tokens < embed_dim * (v_dim + num_tokens)

    def _softmaxes(self, scores: Tensor, lang_mask: Tensor | None, token_dim: int, image_dim: int,
                   ) -> tuple[Tensor, Tensor]:
        """Image-side (over tokens) and text-side (over image positions) attention of fp32 scores."""
        scores = scores.float().clamp(-LOGIT_CLAMP, LOGIT_CLAMP)
        # Text side: each token attends over all image positions (no image padding mask, as official).
        attn_l = scores.softmax(dim=image_dim)
        if lang_mask is not None:
            # Official adds the int mask with zeros replaced by -9e15, so valid tokens get +1.
            mask_term = torch.where(lang_mask.to(scores.device) != 0, 1.0, PAD_FILL).to(scores.dtype)
            shape = [1] * scores.dim()
            shape[0], shape[token_dim] = mask_term.shape
            scores = scores + mask_term.view(shape)
        attn_v = scores.softmax(dim=token_dim)
        return (F.dropout(attn_v, p=self.dropout, training=self.training),
                F.dropout(attn_l, p=self.dropout, training=self.training))

    def attend_projected(self, v: Tensor, lang: Tensor, lang_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The official order: project both sides to the attention width, attend per head, project back."""
        query = self._split_heads(self.v_proj(v) * self.scale)
        key = self._split_heads(self.l_proj(lang))
        value_v = self._split_heads(self.values_v_proj(v))
        value_l = self._split_heads(self.values_l_proj(lang))

        attn_v, attn_l = self._softmaxes(torch.matmul(query, key.transpose(-1, -2)), lang_mask, 3, 2)
        out_v = torch.matmul(attn_v.to(value_l.dtype), value_l)
        out_l = torch.matmul(attn_l.to(value_v.dtype).transpose(-1, -2), value_v)
        return self.out_v_proj(self._merge_heads(out_v)), self.out_l_proj(self._merge_heads(out_l))

    def attend_folded(self, v: Tensor, lang: Tensor, lang_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The same function with the image-side projections folded into the (short) text side.

        Every image-side projection is linear, so it can move to the other factor of the product it
        feeds: ``(v Wq^T + bq) k^T = v (Wq^T k^T) + bq k^T``, ``(a v_l) Wo^T = a (v_l Wo^T)`` and
        ``a^T (v Wv^T + bv) = (a^T v) Wv^T + (a^T 1) bv``, where ``a^T 1 = 1`` unless dropout is on.
        The image tokens are then only multiplied by T-column matrices per head instead of being
        projected to the 2048-wide attention space three times: T / (256 + T) of the multiply-adds
        for GLIP-T's widths (T tokens in the prompt). The head scale multiplies the scores instead of
        the query, which is exact: it is a power of two for GLIP's widths.
        """
        b, n, v_dim = v.shape
        t = lang.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        key = self.l_proj(lang).view(b, t, heads, head_dim)
        value_l = self.values_l_proj(lang).view(b, t, heads, head_dim)

        query_weight = self.v_proj.weight.view(heads, head_dim, v_dim)
        key_on_image = torch.einsum("hdc,bthd->bcht", query_weight, key).reshape(b, v_dim, heads * t)
        key_bias = torch.einsum("hd,bthd->bht", self.v_proj.bias.view(heads, head_dim), key)
        scores = (torch.matmul(v, key_on_image) + key_bias.reshape(b, 1, heads * t)) * self.scale
        attn_v, attn_l = self._softmaxes(scores.view(b, n, heads, t), lang_mask, 3, 1)

        out_weight = self.out_v_proj.weight.view(v_dim, heads, head_dim)
        value_on_image = torch.einsum("bthd,chd->bhtc", value_l, out_weight).reshape(b, heads * t, v_dim)
        out_v = torch.matmul(attn_v.to(v.dtype).view(b, n, heads * t), value_on_image) + self.out_v_proj.bias

        attn_l = attn_l.to(v.dtype).view(b, n, heads * t)
        image_read = torch.matmul(attn_l.transpose(1, 2), v).view(b, heads, t, v_dim)
        value_weight = self.values_v_proj.weight.view(heads, head_dim, v_dim)
        out_l = torch.einsum("bhtc,hdc->bthd", image_read, value_weight)
        value_bias = self.values_v_proj.bias.view(heads, head_dim)
        if self.training and self.dropout > 0:  # dropped attention no longer sums to one over the image
            value_bias = attn_l.sum(dim=1).view(b, heads, t).transpose(1, 2)[..., None] * value_bias
        out_l = out_l + value_bias
        return out_v, self.out_l_proj(out_l.reshape(b, t, heads * head_dim))

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
