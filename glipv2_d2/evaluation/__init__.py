"""Evaluation of grounded detectors with Detectron2's evaluators."""

from .lvis_fixed_ap import LVISFixedAPEvaluator, keep_top_per_category
from .prompted_inference import PromptedDetector

__all__ = ["LVISFixedAPEvaluator", "PromptedDetector", "keep_top_per_category"]
