"""Decoding options of captioning, checked before any decoding step runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from detectron2.config import CfgNode

__all__ = ["CaptionDecodingOptions"]


@dataclass(frozen=True)
class CaptionDecodingOptions:
    """How captions are generated.

    Attributes:
        beam_size: hypotheses kept per image (1 = greedy).
        max_length: most generated tokens, the end token ([SEP]) included; [CLS] starts every
            caption and is not counted. A caption still open after ``max_length`` tokens is cut there.
        min_length: fewest tokens before the end token may be generated.
        length_penalty: a hypothesis scores ``sum(log p) / length ** length_penalty`` (length in
            generated tokens, end token included); 0 ranks by total log-probability, larger values
            favour longer captions.
    """

    beam_size: int = 1
    max_length: int = 20
    min_length: int = 0
    length_penalty: float = 1.0

    def __post_init__(self):
        if not isinstance(self.beam_size, int) or self.beam_size < 1:
            raise ValueError(f"caption beam_size must be a positive integer, got {self.beam_size!r}")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(
                f"caption max_length must be a positive integer (tokens to generate, end token included), "
                f"got {self.max_length!r}"
            )
        if not isinstance(self.min_length, int) or self.min_length < 0:
            raise ValueError(f"caption min_length must be a non-negative integer, got {self.min_length!r}")
        if self.min_length > self.max_length:
            raise ValueError(f"caption min_length {self.min_length} exceeds max_length {self.max_length}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"caption length_penalty must be finite, got {self.length_penalty!r}")

    @classmethod
    def from_config(cls, cfg: CfgNode) -> CaptionDecodingOptions:
        """The MODEL.CAPTION decoding keys."""
        caption = cfg.MODEL.CAPTION
        return cls(caption.BEAM_SIZE, caption.MAX_LENGTH, caption.MIN_LENGTH, caption.LENGTH_PENALTY)

    def updated(self, **changes) -> CaptionDecodingOptions:
        """These options with ``changes`` (None values ignored), checked again."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def normalised_score(self, log_probability: float, length: int) -> float:
        """The ranking score of a hypothesis of ``length`` tokens (see ``length_penalty``)."""
        return log_probability / max(length, 1) ** self.length_penalty
