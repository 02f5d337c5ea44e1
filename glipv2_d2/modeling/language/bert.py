"""BERT text encoder (EncL of GLIP-T / GLIPv2-T).

Mirrors the official ``maskrcnn_benchmark.modeling.language_backbone.bert_model.BertEncoder``
(dot-product-token-loss branch, the one every GLIP/GLIPv2 config uses):

* ``hidden``: the LAST layer's hidden states, unmasked. This is what the fusion tower and the
  region-word head consume (P-before-fusion in the paper's notation).
* ``embedded``: mean of the last ``num_last_layers`` layers, divided AGAIN by ``num_last_layers``
  (an official quirk, a no-op for the GLIP-T setting of 1), times the attention mask.
* ``aggregate``: masked mean of ``embedded`` over the tokens.
* ``masks``: the attention mask, passed through.

Caption mode (``causal=True``) reads each token with the tokens before it only, through a causal
mask and, when decoding, transformers' key/value ``cache`` (positions continue after the cached
tokens); the default bidirectional call is the official one, untouched.

The wrapped ``transformers.BertModel`` has no pooler and lives in ``self.model``, so parameter names
are ``model.embeddings.*`` / ``model.encoder.layer.N.*`` as in the official checkpoints (under
``language_backbone.body.``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertModel, Cache

from .causal import causal_attention_mask

__all__ = ["BertTextEncoder"]


def _as_config(config: BertConfig | Mapping[str, Any] | None) -> BertConfig:
    if config is None:
        return BertConfig()
    if isinstance(config, BertConfig):
        return config
    return BertConfig(**dict(config))


class _BertModelWithoutPooler(BertModel):
    """BertModel whose loading skips a checkpoint's pooler: GLIP never uses it, so transformers'
    load report would list ``pooler.*`` as UNEXPECTED on every run for nothing a user can act on."""

    _keys_to_ignore_on_load_unexpected = [r"^pooler\."]


class BertTextEncoder(nn.Module):
    """``transformers.BertModel`` (no pooler) returning the official GLIP language feature dict."""

    def __init__(
        self,
        config: BertConfig | Mapping[str, Any] | None = None,
        num_last_layers: int = 1,
        use_checkpoint: bool = False,
        model: BertModel | None = None,
    ):
        """Random init from ``config`` (BertConfig or its kwargs; None = bert-base-uncased sized),
        or wrap an already built ``model``. Depth comes from the config, never from elsewhere."""
        super().__init__()
        self.model = model if model is not None else BertModel(_as_config(config), add_pooling_layer=False)
        if self.model.pooler is not None:
            raise ValueError("BertTextEncoder expects a BertModel built with add_pooling_layer=False")
        depth = self.model.config.num_hidden_layers
        if not 1 <= num_last_layers <= depth:
            raise ValueError(f"num_last_layers={num_last_layers} must be in [1, {depth}] (the BERT depth)")
        self.num_last_layers = num_last_layers
        if use_checkpoint:
            self._enable_checkpointing()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        num_last_layers: int = 1,
        use_checkpoint: bool = False,
        config_overrides: Mapping[str, Any] | None = None,
    ) -> BertTextEncoder:
        """Load pretrained weights from a local Hugging Face BERT folder (config.json + weights)."""
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"BERT folder {str(folder)!r} has no config.json")
        config = BertConfig.from_pretrained(str(folder), **dict(config_overrides or {}))
        model = _BertModelWithoutPooler.from_pretrained(str(folder), config=config, add_pooling_layer=False)
        return cls(num_last_layers=num_last_layers, use_checkpoint=use_checkpoint, model=model)

    def _enable_checkpointing(self) -> None:
        """Non-reentrant, as the fusion tower's (it needs no input that requires grad), through
        transformers' own switch: ``activation_checkpointing_enable`` where the installed release has
        it (5.24 does, and deprecates the older ``gradient_checkpointing_enable``), else the older name."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        causal: bool = False,
        cache: Cache | None = None,
    ) -> dict[str, torch.Tensor]:
        """(B, T) ids and mask -> {"hidden", "embedded", "aggregate": (B, T, H)/(B, H), "masks"}.

        ``causal``: each token reads only itself and earlier tokens; with a ``cache`` (causal only)
        ``input_ids`` are the newest tokens after the cached ones, ``attention_mask`` (B, cached + T)
        covers them all, and the cache gains their keys and values.
        """
        if cache is not None and not causal:
            raise ValueError("a key/value cache needs causal=True: bidirectional tokens change with later ones")
        mask = attention_mask
        if causal:
            mask = causal_attention_mask(
                attention_mask, input_ids.shape[1], self.model.dtype, self.model.config._attn_implementation
            )
            attention_mask = attention_mask[:, -input_ids.shape[1]:]
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            output_hidden_states=self.num_last_layers > 1,
            **({"cache": cache} if cache is not None else {}),
        )
        hidden = outputs.last_hidden_state
        if self.num_last_layers == 1:
            features = hidden
        else:
            last = torch.stack(outputs.hidden_states[-self.num_last_layers :], dim=1)
            features = last.mean(dim=1) / self.num_last_layers
        mask = attention_mask.unsqueeze(-1).to(features.dtype)
        embedded = features * mask
        aggregate = embedded.sum(dim=1) / mask.sum(dim=1)
        return {"hidden": hidden, "embedded": embedded, "aggregate": aggregate, "masks": attention_mask}
