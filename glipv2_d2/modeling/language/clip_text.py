"""CLIP-type text encoder of GLIPv2-B / GLIPv2-H (paper appendix D.1 / E: pre-LayerNorm blocks train
more stably than BERT's post-LayerNorm ones).

Official GLIP (``language_backbone/clip_model.py``) semantics, which tests/data/glip_golden_clip_text.pt
holds this module to:

* token embedding + a learned positional table (a bare parameter of CONTEXT_LENGTH rows, 256), no
  embedding LayerNorm or dropout;
* pre-LN blocks ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with QuickGELU and LayerNorm eps 1e-12;
* attention is NOT causal, despite the name: padded keys are masked, nothing else;
* the final LayerNorm of every position is the output: no EOT pooling, no text projection.

The blocks are open_clip's ``ResidualAttentionBlock`` (its parameter names are the official ones:
``attn.in_proj_weight``, ``ln_1``, ``mlp.c_fc`` ...). It takes no key padding mask, so the padding
mask is handed to it as an additive per-head attention mask, which ``nn.MultiheadAttention`` treats
exactly as a key padding mask.

Unlike the official module, prompts need not be padded to CONTEXT_LENGTH: a sequence of T tokens
reads the first T positional rows, and real positions never attend to padding, so their outputs do
not depend on how far the batch is padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "LAYER_NORM_EPS",
    "ClipResidualBlock",
    "ClipTextConfig",
    "ClipTextEncoder",
    "ClipTextTransformer",
    "load_clip_text_weights",
    "padding_attention_mask",
    "resize_positional_embedding",
]

LAYER_NORM_EPS = 1e-12  # GLIP's own LayerNorm class, not CLIP's 1e-5
MLP_RATIO = 4.0
UNICL_TEXT_PREFIX = "text."  # keys of the text tower in a UniCL / CLIP checkpoint


@dataclass(frozen=True)
class ClipTextConfig:
    """Sizes of the CLIP-type text transformer (official ``MODEL.CLIP.*``).

    It also stands for the text encoder where the model needs one config: the fusion tower's text
    layers take width and heads from it, and the MLM head reads ``hidden_size`` and ``vocab_size``
    (and, with no ``hidden_act`` / ``layer_norm_eps`` here, BERT's GELU and eps, as official GLIP's
    MLM head for this encoder does).
    """

    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 256
    vocab_size: int = 49408

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"CLIP text width {self.width} is not divisible by its {self.heads} heads")
        if min(self.width, self.layers, self.heads, self.context_length, self.vocab_size) < 1:
            raise ValueError(f"every size of the CLIP text transformer must be positive: {self}")

    @property
    def hidden_size(self) -> int:
        return self.width


def padding_attention_mask(attention_mask: Tensor, heads: int, dtype: torch.dtype) -> Tensor:
    """(B, T) 1/0 mask -> (B * heads, T, T) additive mask, -inf on padded keys (every query row)."""
    batch, length = attention_mask.shape
    blocked = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    blocked = blocked.masked_fill(attention_mask == 0, float("-inf"))
    return blocked[:, None, None, :].expand(batch, heads, length, length).reshape(batch * heads, length, length)


class ClipResidualBlock(ResidualAttentionBlock):
    """open_clip's pre-LN block with GLIP's settings: QuickGELU, LayerNorm eps 1e-12, batch first.
    Its Linear layers start as the official ones (truncated normal std 0.02, zero bias); the packed
    q/k/v projection keeps torch's initialisation, which the official code does not touch either."""

    def __init__(self, width: int, heads: int):
        super().__init__(
            width, heads, mlp_ratio=MLP_RATIO, act_layer=QuickGELU,
            norm_layer=partial(nn.LayerNorm, eps=LAYER_NORM_EPS), batch_first=True,
        )
        self.heads = heads
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)


class ClipTextTransformer(nn.Module):
    """Official GLIP's ``language_backbone.body`` for the CLIP type: parameter names equal the official
    ones (``token_embedding.weight``, ``positional_embedding``, ``resblocks.N.*``, ``ln_final.*``);
    the embeddings start as officially, truncated normal std 0.02."""

    def __init__(self, config: ClipTextConfig | None = None, use_checkpoint: bool = False):
        super().__init__()
        self.config = config or ClipTextConfig()
        self.use_checkpoint = use_checkpoint
        width = self.config.width
        self.token_embedding = nn.Embedding(self.config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(self.config.context_length, width))
        self.resblocks = nn.ModuleList(ClipResidualBlock(width, self.config.heads) for _ in range(self.config.layers))
        self.ln_final = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        nn.init.trunc_normal_(self.token_embedding.weight, std=0.02)
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) ids and 1/0 mask, T <= CONTEXT_LENGTH -> (B, T, W) final LayerNorm output."""
        length = input_ids.shape[1]
        if length > self.config.context_length:
            raise ValueError(
                f"a prompt batch of {length} tokens exceeds the CLIP text context of {self.config.context_length} "
                "positions (MODEL.CLIP.CONTEXT_LENGTH); MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN must not exceed it"
            )
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]
        mask = padding_attention_mask(attention_mask, self.config.heads, x.dtype)
        checkpointed = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for block in self.resblocks:
            if checkpointed:
                x = checkpoint(block, x, attn_mask=mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=mask)
        return self.ln_final(x)


class ClipTextEncoder(nn.Module):
    """The CLIP-type EncL returning GLIP's language feature dict; the transformer lives in
    ``self.model`` as BERT's does in ``BertTextEncoder``, so its weights are ``language_backbone.model.*``."""

    def __init__(self, config: ClipTextConfig | None = None, use_checkpoint: bool = False):
        """``use_checkpoint``: recompute each block's activations in the backward pass (training)."""
        super().__init__()
        self.model = ClipTextTransformer(config, use_checkpoint)

    @property
    def hidden_size(self) -> int:
        return self.model.config.width

    @property
    def num_layers(self) -> int:
        return self.model.config.layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """(B, T) ids and mask -> {"hidden", "embedded", "aggregate": (B, T, W), "masks"}. As official,
        all three features are the one unpooled final LayerNorm output (no EOT pooling, no projection)."""
        hidden = self.model(input_ids, attention_mask)
        return {"hidden": hidden, "embedded": hidden, "aggregate": hidden, "masks": attention_mask}


def resize_positional_embedding(table: Tensor, length: int) -> Tensor:
    """(L, W) positional table -> (length, W) by bilinear interpolation along the positions
    (official GLIP: UniCL's 77 rows become 256, align_corners False)."""
    grid = table.t()[None, :, :, None]
    resized = F.interpolate(grid, size=(length, 1), mode="bilinear", align_corners=False)
    return resized[0, :, :, 0].t().contiguous()


def load_clip_text_weights(encoder: ClipTextTransformer, path: str | Path) -> None:
    """Start ``encoder`` from a UniCL / CLIP checkpoint, as official ``init_weights``: the tensors
    under ``text.`` (strictly all of the encoder's), the positional table resized to the context."""
    state = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    text = {k.removeprefix(UNICL_TEXT_PREFIX): v for k, v in state.items() if k.startswith(UNICL_TEXT_PREFIX)}
    if not text:
        raise ValueError(f"{path}: no '{UNICL_TEXT_PREFIX}*' tensors, so it holds no UniCL / CLIP text encoder")
    table = text.get("positional_embedding")
    if table is not None and table.shape[0] != encoder.config.context_length:
        text["positional_embedding"] = resize_positional_embedding(table, encoder.config.context_length)
    encoder.load_state_dict(text, strict=True)
