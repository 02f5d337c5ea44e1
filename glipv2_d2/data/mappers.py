"""Detectron2 dataset mappers: dataset dicts -> the GLIPv2 model's inputs (DESIGN.md section 3).

Text is tokenized here, in the data-loader workers, with the model's own tokenizer, and left
unpadded: the model pads a batch to its longest prompt (or to MAX_QUERY_LEN).

Randomness (augmentations, prompt sampling) comes from Python's and NumPy's global generators, as
Detectron2's augmentations do, so the per-worker seeding of Detectron2's data loader makes it
reproducible. ``seed=`` gives a mapper its own generator instead, for tests and single-process use
(every copy of the mapper, e.g. one per worker, then repeats the same stream).
"""

from __future__ import annotations

import copy
import logging
import random
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances
from detectron2.utils.logger import log_every_n_seconds
from transformers import PreTrainedTokenizerBase

from ..modeling.language import build_tokenizer
from .image_io import read_image
from .prompts import (
    DEFAULT_SEPARATOR,
    build_labeled_prompt,
    chunk_categories,
    clean_category_name,
    sample_detection_prompt,
    spans_to_token_map,
    token_map_to_positive_map,
    tokenize_prompts,
)
from .transforms import LegacyResizeShortestEdge, build_test_resize

__all__ = [
    "DetectionGroundingMapper",
    "build_detection_augmentations",
    "category_uid",
    "read_and_augment",
    "sample_rng",
    "transformed_instances",
]

logger = logging.getLogger(__name__)


def build_detection_augmentations(cfg: CfgNode, is_train: bool) -> list[T.Augmentation]:
    """Official GLIP augmentations: multi-scale shortest-edge resize + flip (train), one size (test).

    Detectron2's ``build_augmentation`` with the resize swapped for the official size rule when
    cfg.INPUT.LEGACY_RESIZE is set ("range" sampling then picks among every integer size).
    """
    if not is_train:
        return [build_test_resize(cfg)]
    min_sizes, max_size = cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN
    sampling = cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    if cfg.INPUT.LEGACY_RESIZE:
        if sampling == "range":
            min_sizes = range(min(min_sizes), max(min_sizes) + 1)
        elif sampling != "choice":
            raise ValueError(f"INPUT.MIN_SIZE_TRAIN_SAMPLING={sampling!r}: the legacy resize supports choice/range")
        augmentations: list[T.Augmentation] = [LegacyResizeShortestEdge(min_sizes, max_size)]
    else:
        augmentations = [T.ResizeShortestEdge(min_sizes, max_size, sampling)]
    if cfg.INPUT.RANDOM_FLIP != "none":
        augmentations.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    return augmentations


def category_uid(name: str) -> int:
    """Non-negative id of a category name that every dataset shares ("person" of COCO and of
    Objects365 alike), unlike contiguous ids; the inter-image loss compares categories across images."""
    return zlib.crc32(clean_category_name(name).lower().encode("utf-8")) & 0x7FFFFFFF


@contextmanager
def global_rngs_seeded(seed: int | None) -> Iterator[None]:
    """Let Detectron2 augmentations (global RNGs) draw from ``seed``, restoring the global state after."""
    if seed is None:
        yield
        return
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def sample_rng(mapper_rng: random.Random | None) -> random.Random:
    """One generator per sample, drawn from the mapper's own stream when it has one (``seed=``),
    else from Python's global generator (seeded per draw or per worker by the loader)."""
    return random.Random((mapper_rng if mapper_rng is not None else random).getrandbits(64))


def read_and_augment(
    dataset_dict: dict, image_format: str, augmentations: T.AugmentationList, rng: random.Random, seeded: bool
) -> tuple[np.ndarray, T.TransformList]:
    """Read the image, check its recorded size and augment it; a ``seeded`` mapper makes the global
    generators Detectron2's augmentations draw from follow ``rng``."""
    image = read_image(dataset_dict["file_name"], image_format)
    utils.check_image_size(dataset_dict, image)
    aug_input = T.AugInput(image)
    with global_rngs_seeded(rng.getrandbits(32) if seeded else None):
        transforms = augmentations(aug_input)
    return aug_input.image, transforms


def transformed_instances(
    annotations: list[dict],
    transforms: T.TransformList,
    image_hw: tuple[int, int],
    use_instance_mask: bool,
    mask_format: str,
) -> Instances:
    """Transformed, clipped boxes (and masks when every box has one: Instances cannot hold a
    partial field), in annotation order; the caller filters empty ones after adding its fields."""
    keep_masks = use_instance_mask and all("segmentation" in obj for obj in annotations)
    for obj in annotations:
        if not keep_masks:
            obj.pop("segmentation", None)
        obj.pop("keypoints", None)
    annotations = [utils.transform_instance_annotations(obj, transforms, image_hw) for obj in annotations]
    return utils.annotations_to_instances(annotations, image_hw, mask_format=mask_format)


def _dataset_classes(cfg: CfgNode, is_train: bool, dataset_names: Sequence[str] | None) -> list[str]:
    names = list(dataset_names or (cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST[:1]))
    if not names:
        raise ValueError("DetectionGroundingMapper: no dataset named (cfg.DATASETS and dataset_names are empty)")
    vocabularies = {name: MetadataCatalog.get(name).get("thing_classes") for name in names}
    missing = [name for name, classes in vocabularies.items() if not classes]
    if missing:
        raise ValueError(f"datasets {missing} have no 'thing_classes' metadata; the prompt needs category names")
    first = vocabularies[names[0]]
    if any(list(classes) != list(first) for classes in vocabularies.values()):
        raise ValueError(
            f"datasets {names} have different 'thing_classes'; build one DetectionGroundingMapper per "
            "dataset (pass dataset_names=) since contiguous category ids mean different names"
        )
    return list(first)


class DetectionGroundingMapper:
    """Detection dataset dict -> grounding input: image, category prompt, tokens, Instances.

    Training prompts are the image's categories plus sampled negatives in random order (see
    ``sample_detection_prompt``); boxes whose category does not fit MAX_QUERY_LEN are dropped.
    ``instances.positive_map`` is BOOLEAN (num_boxes, len(input_ids)): row i marks the tokens of box
    i's category, the binary form the official loss consumes. "label_uids" maps each label of the
    prompt (every box's among them) to its ``category_uid``, the category's identity across datasets.
    Test prompts are every category in dataset order; when they do not fit one prompt only the first
    chunk (``chunk_categories`` with TEST.PROMPT_CHUNK_SIZE) is given here, and evaluation runs the
    other chunks itself. As in Detectron2's DatasetMapper, test outputs carry no annotations.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: Sequence[T.Augmentation],
        image_format: str,
        tokenizer: PreTrainedTokenizerBase,
        class_names: Sequence[str],
        max_query_len: int = 256,
        max_negatives: int = 85,
        full_negatives_prob: float = 1.0,
        shuffle_prompt: bool = True,
        separator: str = DEFAULT_SEPARATOR,
        use_instance_mask: bool = False,
        instance_mask_format: str = "polygon",
        test_chunk_size: int | None = None,
        seed: int | None = None,
    ):
        if image_format not in ("BGR", "RGB"):
            raise ValueError(f"image_format must be 'BGR' or 'RGB', got {image_format!r}")
        if not class_names:
            raise ValueError("DetectionGroundingMapper: class_names is empty")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.tokenizer = tokenizer
        self.names = dict(enumerate(class_names))
        self.label_uids = {label: category_uid(name) for label, name in self.names.items()}
        self.max_query_len = max_query_len
        self.max_negatives = max_negatives
        self.full_negatives_prob = full_negatives_prob
        self.shuffle_prompt = shuffle_prompt
        self.separator = separator
        self.use_instance_mask = use_instance_mask
        self.instance_mask_format = instance_mask_format
        self._rng = random.Random(seed) if seed is not None else None
        self._test_text = None if is_train else self._test_prompt(test_chunk_size)

    @classmethod
    def from_config(
        cls,
        cfg: CfgNode,
        is_train: bool = True,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        dataset_names: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> dict:
        """Pass the model's tokenizer (``model.tokenizer``); without one, the config's is built.

        Category names are the ``thing_classes`` of ``dataset_names``, else of cfg.DATASETS.TRAIN or
        cfg.DATASETS.TEST[0]; several datasets must share them.
        """
        if tokenizer is None:
            tokenizer = build_tokenizer(cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER)
        return {
            "is_train": is_train,
            "augmentations": build_detection_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "tokenizer": tokenizer,
            "class_names": _dataset_classes(cfg, is_train, dataset_names),
            "max_query_len": cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN,
            "max_negatives": cfg.DATASETS.MAX_NEGATIVE_CATEGORIES,
            "full_negatives_prob": cfg.DATASETS.FULL_NEGATIVES_PROB,
            "shuffle_prompt": cfg.DATASETS.SHUFFLE_PROMPT,
            "separator": cfg.DATASETS.SEPARATOR,
            "use_instance_mask": cfg.MODEL.MASK_ON,
            "instance_mask_format": cfg.INPUT.MASK_FORMAT,
            "test_chunk_size": cfg.TEST.PROMPT_CHUNK_SIZE or None,
            "seed": seed,
        }

    def _test_prompt(self, chunk_size: int | None) -> dict:
        """The one prompt every test image shares, built once."""
        chunk = chunk_categories(self.names, self.tokenizer, self.max_query_len, chunk_size, self.separator)[0]
        if len(chunk) < len(self.names):
            logger.warning(
                "Test prompt holds the first %d of %d categories (MAX_QUERY_LEN=%d); the rest need the "
                "chunked evaluation",
                len(chunk),
                len(self.names),
                self.max_query_len,
            )
        return self._encode_text(*build_labeled_prompt(chunk, self.separator))

    def _encode_text(self, caption: str, spans: dict[int, list[tuple[int, int]]]) -> dict:
        tokenized = tokenize_prompts(self.tokenizer, caption, self.max_query_len)
        return {
            "caption": caption,
            "input_ids": tokenized["input_ids"][0],
            "attention_mask": tokenized["attention_mask"][0],
            "label_to_tokens": spans_to_token_map(tokenized, spans, self.max_query_len, caption=caption),
        }

    def _instances(self, annotations: list[dict], transforms: T.TransformList, image_hw: tuple[int, int]) -> Instances:
        """Transformed, clipped non-crowd boxes; empty ones (e.g. wholly outside the image) removed."""
        annotations = [obj for obj in annotations if obj.get("iscrowd", 0) == 0]
        instances = transformed_instances(
            annotations, transforms, image_hw, self.use_instance_mask, self.instance_mask_format
        )
        return utils.filter_empty_instances(instances)

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        rng = sample_rng(self._rng)
        image, transforms = read_and_augment(
            dataset_dict, self.image_format, self.augmentations, rng, seeded=self._rng is not None
        )
        image_hw = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        dataset_dict["task"] = "detection"
        annotations = dataset_dict.pop("annotations", None) or []

        if not self.is_train:
            text = self._test_text
            dataset_dict.update(text, label_to_tokens={k: list(v) for k, v in text["label_to_tokens"].items()})
            return dataset_dict

        instances = self._instances(annotations, transforms, image_hw)
        classes = instances.gt_classes.tolist()
        unknown = sorted(set(classes) - set(self.names))
        if unknown:
            raise ValueError(
                f"{dataset_dict['file_name']}: category ids {unknown} are outside the {len(self.names)} "
                "contiguous ids of the dataset's thing_classes"
            )
        caption, spans, kept = sample_detection_prompt(
            classes,
            self.names,
            self.tokenizer,
            self.max_query_len,
            self.max_negatives,
            rng,
            shuffle=self.shuffle_prompt,
            separator=self.separator,
            full_negatives_prob=self.full_negatives_prob,
        )
        kept_set = set(kept)
        keep = torch.tensor([label in kept_set for label in classes], dtype=torch.bool)
        if not keep.all():
            log_every_n_seconds(
                logging.WARNING,
                f"{dataset_dict['file_name']}: dropped {int((~keep).sum())} boxes whose categories do not "
                f"fit MAX_QUERY_LEN={self.max_query_len}",
                n=30,
                name=__name__,
            )
            instances = instances[keep]
        text = self._encode_text(caption, spans)
        instances.positive_map = token_map_to_positive_map(
            text["label_to_tokens"], instances.gt_classes.tolist(), len(text["input_ids"])
        ).bool()
        label_uids = {label: self.label_uids[label] for label in text["label_to_tokens"]}
        dataset_dict.update(text, instances=instances, label_uids=label_uids)
        return dataset_dict
