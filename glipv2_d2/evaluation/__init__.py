"""Evaluation of grounded detectors with Detectron2's evaluators."""

from .prompted_inference import PromptedDetector

__all__ = ["PromptedDetector"]
