"""Captioning: the CaptionHead (next-token loss in caption mode), decoding options, cached and
recomputing decoders, greedy and beam search, grounded words and phrases."""

from .generate import check_caption_room, generate_captions
from .grounding import FUNCTION_WORDS, CaptionWord, GroundedSpan, caption_words, content_phrases
from .head import CaptionHead, next_token_labels
from .options import CaptionDecodingOptions
from .search import CaptionHypothesis, beam_search, greedy_search
from .steppers import CachedCaptionStepper, CaptionStepper, RecomputingCaptionStepper, encode_image_side

__all__ = [
    "FUNCTION_WORDS",
    "CachedCaptionStepper",
    "CaptionDecodingOptions",
    "CaptionHead",
    "CaptionHypothesis",
    "CaptionStepper",
    "CaptionWord",
    "GroundedSpan",
    "RecomputingCaptionStepper",
    "beam_search",
    "caption_words",
    "check_caption_room",
    "content_phrases",
    "encode_image_side",
    "generate_captions",
    "greedy_search",
    "next_token_labels",
]
