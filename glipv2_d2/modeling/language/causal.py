"""Causal attention masks for the text side of caption mode (the BERT encoder and the fusion
tower's BERT layers read only earlier tokens), in the form transformers' BERT layers take."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["causal_attention_mask"]


def causal_attention_mask(lang_mask: Tensor, query_length: int, dtype: torch.dtype, attn_implementation: str) -> Tensor:
    """(B, 1, q, K) mask of the last ``query_length`` tokens of a (B, K) 0/1 ``lang_mask``: each of
    them attends to the real tokens at or before its own position. With a key/value cache ``K`` is
    the cached length plus ``q``; without one ``q == K``.

    ``sdpa`` takes a boolean mask (True = attend); ``eager`` adds a float mask with the dtype's most
    negative value where attention is cut, as ``text_attention_mask`` does for the padding.
    """
    total = lang_mask.shape[1]
    if not 0 < query_length <= total:
        raise ValueError(f"query_length {query_length} must lie in [1, {total}] (the mask's tokens)")
    keys = torch.arange(total, device=lang_mask.device)
    queries = keys[total - query_length:]
    keep = (lang_mask != 0)[:, None, None, :] & (keys[None, :] <= queries[:, None])[None, None]
    if attn_implementation == "sdpa":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
