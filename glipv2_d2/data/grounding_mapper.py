"""Phrase-grounding and pseudo-labelled caption dataset dicts -> GLIPv2 inputs.

The sentence itself is the text the model reads; each box's character spans ("tokens_positive")
become a BOOLEAN row of ``instances.positive_map`` over the caption's tokens, the same form as
DetectionGroundingMapper's. Augmentations and their per-sample seeding are the detection mapper's.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances
from detectron2.utils.logger import log_every_n_seconds
from transformers import BatchEncoding, PreTrainedTokenizerBase

from ..structures import Prompt
from .mappers import build_detection_augmentations, read_and_augment, sample_randomness, transformed_instances
from .prompt_builder import PromptBuilder
from .prompts import check_spans, token_map_to_positive_map

__all__ = ["GroundingMapper", "swap_left_right"]

logger = logging.getLogger(__name__)

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)

Span = list[int]
PositionMap = Callable[[int], int]


def _same_case(word: str, replacement: str) -> str:
    if word.isupper():
        return replacement.upper()
    if word[0].isupper():
        return replacement.capitalize()
    return replacement


def swap_left_right(caption: str) -> tuple[str, PositionMap]:
    """Mirror a caption for a horizontally flipped image: "left" <-> "right" as whole words, case kept.

    Returns the new caption and the map old -> new character position: the two words differ in
    length, so every span after a swapped word moves by one character per swap.
    """
    pieces: list[str] = []
    edits: list[tuple[int, int, int]] = []  # (start, end, length change) of each swapped word
    last = 0
    for match in _LEFT_RIGHT.finditer(caption):
        word = match.group(0)
        new = _same_case(word, "right" if word.lower() == "left" else "left")
        pieces += [caption[last : match.start()], new]
        edits.append((match.start(), match.end(), len(new) - len(word)))
        last = match.end()
    pieces.append(caption[last:])

    def position(old: int) -> int:
        shift = 0
        for start, end, change in edits:
            if old >= end:
                shift += change
            elif old > start:  # inside a swapped word: keep the offset, within the new word
                return start + shift + min(old - start, end - start + change)
            else:
                break
        return old + shift

    return "".join(pieces), position


def _is_mirrored(transforms: T.TransformList) -> bool:
    """An odd number of horizontal flips leaves the image mirrored."""
    return sum(isinstance(t, T.HFlipTransform) for t in transforms.transforms) % 2 == 1


def _kept_end(tokenized: BatchEncoding) -> int:
    """Caption characters before this index survived truncation (end of the last real token)."""
    offsets = torch.as_tensor(tokenized["offset_mapping"])[0]
    real = offsets[:, 1] > offsets[:, 0]
    return int(offsets[real, 1].max())


def _where(dataset_dict: dict) -> str:
    return f"{dataset_dict.get('file_name')} (image {dataset_dict.get('image_id')})"


def _visible_spans(spans: Sequence[Span], caption: str, move: PositionMap | None, kept_end: int) -> list[Span]:
    """Spans in the (possibly mirrored) caption, cut at the truncation point; gone ones dropped."""
    visible = []
    for start, end in spans:
        if move is not None:
            start, end = move(start), move(end)
        end = min(end, kept_end)
        if start < end and caption[start:end].strip():
            visible.append([start, end])
    return visible


class GroundingMapper:
    """Grounding / caption dataset dict (see datasets/mdetr.py) -> image, sentence, tokens, Instances.

    Training: the caption is tokenized (at most MAX_QUERY_LEN tokens; a longer one is truncated,
    spans are cut at the last kept character and boxes whose spans fall entirely outside it are
    dropped, with a warning). ``instances.positive_map`` is BOOLEAN (num_boxes, len(input_ids)): row
    i marks the tokens of box i's spans. Boxes the caption does not mention (no span) are dropped:
    no token can match them. When the image ends up mirrored, "left" and "right" are swapped in
    the caption (``swap_left_right``) and the spans follow. Outputs "image", "instances"
    (gt_boxes, gt_classes, positive_map, gt_masks with MASK_ON), "prompt" (labels = box rows),
    "loss_weight" (MODEL.WEAK_SAMPLE_LOSS_WEIGHT for "weak" records, else 1), "height", "width";
    "annotations" and "phrases" are removed.

    Test: no annotation is consumed; "phrases" and "annotations" stay untouched for the evaluator,
    and the prompt's labels are indices into "phrases" (their tokens those of the phrase's spans).
    A phrase truncated away entirely has no label (it gets no prediction, an evaluator miss).

    A span outside the caption is an error naming the image and the span.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: Sequence[T.Augmentation],
        image_format: str,
        prompt_builder: PromptBuilder,
        weak_loss_weight: float = 1.0,
        swap_left_right: bool = True,
        use_instance_mask: bool = False,
        instance_mask_format: str = "polygon",
    ):
        if image_format not in ("BGR", "RGB"):
            raise ValueError(f"image_format must be 'BGR' or 'RGB', got {image_format!r}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.prompt_builder = prompt_builder
        self.weak_loss_weight = weak_loss_weight
        self.swap_left_right = swap_left_right
        self.use_instance_mask = use_instance_mask
        self.instance_mask_format = instance_mask_format

    @classmethod
    def from_config(
        cls,
        cfg: CfgNode,
        is_train: bool = True,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> dict:
        """Pass the model's tokenizer (``model.tokenizer``); without one, the config's is built."""
        return {
            "is_train": is_train,
            "augmentations": build_detection_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "prompt_builder": PromptBuilder(cfg, tokenizer),
            "weak_loss_weight": cfg.MODEL.WEAK_SAMPLE_LOSS_WEIGHT,
            "use_instance_mask": cfg.MODEL.MASK_ON,
            "instance_mask_format": cfg.INPUT.MASK_FORMAT,
        }

    def _instances(
        self,
        annotations: list[dict],
        transforms: T.TransformList,
        image_hw: tuple[int, int],
        positive_map: torch.Tensor,
        where: str,
    ) -> Instances:
        """Transformed, clipped boxes with their positive-map rows; empty boxes removed with their rows."""
        instances = transformed_instances(
            annotations, transforms, image_hw, self.use_instance_mask, self.instance_mask_format, where
        )
        instances.positive_map = positive_map
        return utils.filter_empty_instances(instances)

    def _train_targets(
        self,
        dataset_dict: dict,
        original_caption: str,
        move: PositionMap | None,
        tokenized: BatchEncoding,
        transforms: T.TransformList,
        image_hw: tuple[int, int],
    ) -> tuple[Prompt, Instances]:
        """The caption's prompt (label = row of a kept box) and the kept boxes with their token rows."""
        where = _where(dataset_dict)
        caption = dataset_dict["caption"]
        annotations = [obj for obj in dataset_dict.pop("annotations", None) or [] if obj.get("iscrowd", 0) == 0]
        kept_end = _kept_end(tokenized)
        visible = []
        for i, obj in enumerate(annotations):
            spans = check_spans(obj.get("tokens_positive") or [], original_caption, f"{where}, box #{i}")
            visible.append(_visible_spans(spans, caption, move, kept_end))
        truncated = sum(bool(obj.get("tokens_positive")) and not v for obj, v in zip(annotations, visible))
        if truncated:
            log_every_n_seconds(
                logging.WARNING,
                f"{where}: dropped {truncated} boxes whose phrases lie beyond "
                f"MAX_QUERY_LEN={self.prompt_builder.max_query_len}",
                n=30,
                name=__name__,
            )
        kept = [i for i, spans in enumerate(visible) if spans]
        prompt = self.prompt_builder.encode(
            caption, {row: visible[i] for row, i in enumerate(kept)}, tokenized=tokenized
        )
        positive_map = token_map_to_positive_map(prompt.label_to_tokens, list(range(len(kept))), len(prompt)).bool()
        return prompt, self._instances([annotations[i] for i in kept], transforms, image_hw, positive_map, where)

    def _phrase_prompt(
        self, dataset_dict: dict, original_caption: str, move: PositionMap | None, tokenized: BatchEncoding
    ) -> Prompt:
        """The caption's prompt with label = index into "phrases"; phrases truncated away are left out."""
        where = _where(dataset_dict)
        caption = dataset_dict["caption"]
        kept_end = _kept_end(tokenized)
        visible = {}
        for label, phrase in enumerate(dataset_dict.get("phrases") or []):
            spans = check_spans(phrase.get("tokens_positive") or [], original_caption, f"{where}, phrase #{label}")
            visible[label] = _visible_spans(spans, caption, move, kept_end)
        missing = [label for label, spans in visible.items() if not spans]
        if missing:
            logger.warning(
                "%s: phrases %s lie beyond MAX_QUERY_LEN=%d; they get no prediction",
                where, missing, self.prompt_builder.max_query_len,
            )
        spans_per_label = {label: spans for label, spans in visible.items() if spans}
        names = {label: " ".join(caption[a:b] for a, b in spans) for label, spans in spans_per_label.items()}
        return self.prompt_builder.encode(caption, spans_per_label, label_names=names, tokenized=tokenized)

    def __call__(self, dataset_dict: dict, seed: int | None = None) -> dict:
        """Every random choice of this sample derives from ``seed`` (see ``sample_randomness``)."""
        dataset_dict = copy.deepcopy(dataset_dict)
        original_caption = dataset_dict.get("caption")
        if not isinstance(original_caption, str) or not original_caption.strip():
            raise ValueError(f"{_where(dataset_dict)}: a grounding record needs a non-empty 'caption'")
        with sample_randomness(seed):
            image, transforms = read_and_augment(dataset_dict, self.image_format, self.augmentations)
        image_hw = image.shape[:2]
        move = None
        caption = original_caption
        if self.swap_left_right and _is_mirrored(transforms):
            caption, move = swap_left_right(original_caption)
        tokenized = self.prompt_builder.tokenize(caption)
        dataset_dict.update(
            image=torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
            caption=caption,
            loss_weight=self.weak_loss_weight if dataset_dict.get("weak", False) else 1.0,
        )
        if not self.is_train:
            dataset_dict["prompt"] = self._phrase_prompt(dataset_dict, original_caption, move, tokenized)
            return dataset_dict
        dataset_dict["prompt"], dataset_dict["instances"] = self._train_targets(
            dataset_dict, original_caption, move, tokenized, transforms, image_hw
        )
        dataset_dict.pop("phrases", None)
        return dataset_dict
