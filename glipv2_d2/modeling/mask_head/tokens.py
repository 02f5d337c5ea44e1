"""Which tokens a box's mask reads: a label's (inference) or its matched GT phrase's (training).

A mask logit is the MEAN over those tokens of the per-token logits (then a sigmoid), unlike the
box score, which averages token probabilities. Weights are ``(N, T)`` rows summing to 1 over the
tokens read, so the mean is one contraction and never touches another token.
"""

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["label_token_weights", "mean_token_logits", "positive_token_weights"]

logger = logging.getLogger(__name__)


def label_token_weights(labels: Tensor, label_to_tokens: Mapping[int, Sequence[int]], num_tokens: int) -> Tensor:
    """``(N, T)`` weights averaging each detection's label tokens.

    A label missing from the map reads no token: its mean logit is 0 and its mask probability 0.5
    everywhere (official behaviour), which pastes as an empty mask; a warning names the label.
    """
    weights = torch.zeros(len(labels), num_tokens, device=labels.device)
    for label in labels.unique().tolist():
        tokens = label_to_tokens.get(label)
        if tokens is None:
            logger.warning("label %d is not in the prompt's label->token map: its mask is empty", label)
            continue
        tokens = [tokens] if isinstance(tokens, int) else list(tokens)
        if not tokens or not all(0 <= t < num_tokens for t in tokens):
            raise ValueError(f"label {label}: tokens {tokens} are not indices among the prompt's {num_tokens} tokens")
        index = torch.tensor(tokens, device=labels.device)
        share = torch.full((len(tokens),), 1.0 / len(tokens), device=labels.device)
        weights[labels == label] = weights.new_zeros(num_tokens).index_add_(0, index, share)  # repeats count twice
    return weights


def positive_token_weights(positive_map: Tensor) -> Tensor:
    """``(N, T)`` weights averaging each row's positive tokens (a binary or 0/1-valued map); an
    empty row stays zero."""
    positive = (positive_map > 0).float()
    return positive / positive.sum(dim=1, keepdim=True).clamp(min=1.0)


def mean_token_logits(token_logits: Tensor, weights: Tensor) -> Tensor:
    """``(N, T, M, M)`` per-token logits and ``(N, T)`` weights -> ``(N, M, M)`` mean logits."""
    return torch.einsum("nthw,nt->nhw", token_logits, weights.to(token_logits.dtype))
