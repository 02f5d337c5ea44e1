"""Caption records (one image, its reference captions) -> caption-mode model inputs.

Training draws one reference per sample (from the sample's seed) and makes it the prompt the
causal text side reads and learns to predict; with no boxes the model trains its language model
only (grounded captioning data go through ``GroundingMapper`` instead). A horizontally flipped
image gets "left" and "right" swapped in its caption, as grounding captions do. At test time the
input carries the image, its size and id, and the references ("captions") the evaluator scores.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import transforms as T
from transformers import PreTrainedTokenizerBase

from .grounding_mapper import _is_mirrored, swap_left_right
from .mappers import build_detection_augmentations, read_and_augment, sample_randomness
from .prompt_builder import PromptBuilder

__all__ = ["CaptionMapper"]


class CaptionMapper:
    """Callable as ``mapper(dataset_dict, seed=None)`` like the other training mappers."""

    @configurable
    def __init__(self, *, is_train: bool, augmentations: list, image_format: str, prompt_builder: PromptBuilder):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.prompt_builder = prompt_builder

    @classmethod
    def from_config(cls, cfg: CfgNode, is_train: bool = True, tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
        return {
            "is_train": is_train,
            "augmentations": build_detection_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "prompt_builder": PromptBuilder(cfg, tokenizer),
        }

    def __call__(self, dataset_dict: dict, seed: int | None = None) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        captions = dataset_dict.get("captions")
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError(f"{dataset_dict.get('file_name')}: a caption record needs non-empty 'captions'")
        with sample_randomness(seed) as rng:
            image, transforms = read_and_augment(dataset_dict, self.image_format, self.augmentations)
            caption = rng.choice(captions)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.is_train:
            if _is_mirrored(transforms):
                caption, _ = swap_left_right(caption)
            dataset_dict["prompt"] = self.prompt_builder.caption(caption)
            dataset_dict["caption"] = caption
        return dataset_dict
