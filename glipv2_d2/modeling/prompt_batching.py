"""(image, prompt) pairs through the fusion tower in groups that fit a memory budget.

An image read with several prompts (a long vocabulary's chunks, or several prompts given to the
predictor) shares its backbone levels; only the fusion tower, the head and post-processing read the
text. Running all pairs as one batch saves the per-call cost of small batches, but the fusion's
activations grow with the image positions times the prompt length, so the pairs are cut into
groups whose estimated activations stay within TEST.FUSION_BATCH_MEMORY_MB.
"""

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["FusionBatchBudget", "PromptPair"]

FLOAT_BYTES = 4  # the estimate assumes float32 activations (scores and softmaxes are float32 even under autocast)


@dataclass(frozen=True)
class PromptPair:
    """One image read with one prompt."""

    image: int  # the image's index in the batch
    prompt: int  # the prompt's place among the image's prompts (its place in the output)
    row: int  # the prompt's row among the encoded distinct prompts


@dataclass(frozen=True)
class FusionBatchBudget:
    """How many (image, prompt) pairs run through the fusion tower as one batch.

    ``memory_mb`` 0 runs every pair alone; a pair estimated above the budget still runs, alone.
    ``channels`` is the widest image level (before or after fusion), ``embed_dim`` and
    ``num_heads`` the bidirectional attention's width and heads.
    """

    memory_mb: float = 4096
    channels: int = 256
    embed_dim: int = 2048
    num_heads: int = 8

    def __post_init__(self) -> None:
        if not self.memory_mb >= 0:  # also refuses NaN
            raise ValueError(
                f"TEST.FUSION_BATCH_MEMORY_MB must be >= 0 (0: one image-prompt pair at a time), got {self.memory_mb}"
            )

    def pair_bytes(self, positions: int, tokens: int) -> int:
        """Estimated activation bytes of one pair at ``positions`` image positions (sum of H*W over
        the levels) and a prompt padded to ``tokens``, at the peak of one fusion layer (layers run
        one after another without gradients). Counted, per position, in float32: the repeated
        backbone levels and ~4 copies of the image levels inside the layer (LayerNorm, residual,
        DyConv) at ``channels``; the image-side query, value and attention output at ``embed_dim``
        (the official order; short prompts take the folded order without them, so the estimate is
        then high);
        the bidirectional attention's score matrix (positions x heads x tokens) with its two
        softmaxes; the head's region-word logits and post-processing's probabilities and label
        scores (positions x tokens, 3 copies). Text-side activations (tokens x width) are left out:
        they are small next to these."""
        per_position = 5 * self.channels + 3 * self.embed_dim + 3 * self.num_heads * tokens + 3 * tokens
        return FLOAT_BYTES * positions * per_position

    def groups(self, pairs: Sequence[PromptPair], lengths: Sequence[int], positions: int) -> list[list[PromptPair]]:
        """``pairs`` cut into groups within the budget, each padded to its longest prompt
        (``lengths[pair.row]`` tokens). Pairs are taken shortest prompt first, so that prompts of
        similar length share a group and little padding is computed."""
        budget = self.memory_mb * 2**20
        groups: list[list[PromptPair]] = []
        longest = 0
        for pair in sorted(pairs, key=lambda p: lengths[p.row]):
            length = max(longest, lengths[pair.row])
            if groups and (len(groups[-1]) + 1) * self.pair_bytes(positions, length) <= budget:
                groups[-1].append(pair)
                longest = length
            else:
                groups.append([pair])
                longest = lengths[pair.row]
        return groups
