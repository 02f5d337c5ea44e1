"""Evaluation of grounded detectors with Detectron2's evaluators."""

from .flickr30k import Flickr30kGroundingEvaluator
from .lvis_fixed_ap import LVISFixedAPEvaluator, keep_top_per_category
from .prompted_inference import PromptedDetector

__all__ = ["Flickr30kGroundingEvaluator", "LVISFixedAPEvaluator", "PromptedDetector", "keep_top_per_category"]
