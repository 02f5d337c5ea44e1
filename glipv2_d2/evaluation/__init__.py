"""Evaluation of grounded detectors with Detectron2's evaluators."""

from .captioning import CaptionEvaluator, most_frequent_caption
from .flickr30k import Flickr30kGroundingEvaluator
from .lvis_fixed_ap import (
    LVISFixedAPEvaluator,
    NumpyCompatibleLVISEvaluator,
    keep_top_per_category,
    lvis_numpy_float_alias,
)
from .phrasecut import PhraseCutEvaluator
from .prompted_inference import PromptedDetector
from .vqa import VQAEvaluator, majority_answer_per_type

__all__ = [
    "CaptionEvaluator",
    "Flickr30kGroundingEvaluator",
    "LVISFixedAPEvaluator",
    "NumpyCompatibleLVISEvaluator",
    "PhraseCutEvaluator",
    "PromptedDetector",
    "VQAEvaluator",
    "keep_top_per_category",
    "lvis_numpy_float_alias",
    "majority_answer_per_type",
    "most_frequent_caption",
]
