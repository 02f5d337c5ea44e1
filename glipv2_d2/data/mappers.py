"""Detectron2 dataset mappers: dataset dicts -> the GLIPv2 model's inputs.

Text is tokenized here, in the data-loader workers, with the model's own tokenizer, and left
unpadded: the model pads a batch to its longest prompt (or to MAX_QUERY_LEN).

Every random choice of a sample (augmentations, prompt sampling) derives from the one seed a
training mapper is called with, ``mapper(dataset_dict, seed=...)``: the resumable training loader
passes a seed derived from (DATALOADER.SEED, draw), so a sample does not depend on which worker
maps it. Without one (Detectron2's test loaders) a fresh seed is drawn from Python's global generator.
"""

from __future__ import annotations

import copy
import logging
import random
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

from ..structures import Prompt
from ..utils.seeding import fresh_seed
from .image_io import read_image
from .prompt_builder import PromptBuilder
from .prompts import category_uid, token_map_to_positive_map
from .transforms import LegacyResizeShortestEdge, build_test_resize

__all__ = [
    "DetectionGroundingMapper",
    "build_detection_augmentations",
    "read_and_augment",
    "sample_randomness",
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


@contextmanager
def sample_randomness(seed: int | None) -> Iterator[random.Random]:
    """Scope in which every random choice of one sample derives from ``seed`` (a fresh one if None).

    Detectron2's augmentations draw from Python's and NumPy's global generators, so both are seeded
    with ``seed`` inside and restored on exit; nothing else sees them move. The yielded generator, for
    the sample's other choices (its prompt), is seeded from Python's first 64 bits: the order of draws
    the training stream has always had, so a given (DATALOADER.SEED, draw) keeps its sample.
    """
    seed = fresh_seed() if seed is None else seed
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield random.Random(random.getrandbits(64))
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def read_and_augment(
    dataset_dict: dict, image_format: str, augmentations: T.AugmentationList
) -> tuple[np.ndarray, T.TransformList]:
    """Read the image, check its recorded size and augment it (inside ``sample_randomness``)."""
    image = read_image(dataset_dict["file_name"], image_format)
    utils.check_image_size(dataset_dict, image)
    aug_input = T.AugInput(image)
    transforms = augmentations(aug_input)
    return aug_input.image, transforms


def _keeps_masks(annotations: list[dict], use_instance_mask: bool, mask_format: str, where: str) -> bool:
    """Whether the image's Instances get gt_masks: only when every box has a mask, since Instances
    cannot hold a field for some boxes only. An image whose annotations mix boxes with and without
    masks trains its boxes and no mask (a warning names it; the loaders already counted why masks
    were removed); an image with no mask at all (detection-only data) is normal and stays quiet."""
    if not use_instance_mask:
        return False
    with_mask = sum("segmentation" in obj for obj in annotations)
    if with_mask < len(annotations):
        if with_mask:
            log_every_n_seconds(
                logging.WARNING,
                f"{where}: {len(annotations) - with_mask} of {len(annotations)} boxes have no mask; "
                "the image trains its boxes without masks",
                n=30,
                name=__name__,
            )
        return False
    if mask_format == "polygon" and any(isinstance(obj["segmentation"], dict) for obj in annotations):
        raise ValueError(f"{where}: RLE masks need INPUT.MASK_FORMAT 'bitmask' (polygon masks cannot hold them)")
    return True


def transformed_instances(
    annotations: list[dict],
    transforms: T.TransformList,
    image_hw: tuple[int, int],
    use_instance_mask: bool,
    mask_format: str,
    where: str = "an image",
) -> Instances:
    """Transformed, clipped boxes (and masks when every box has one, see ``_keeps_masks``), in
    annotation order; the caller filters empty ones after adding its fields. ``where`` names the
    image in warnings and errors."""
    keep_masks = _keeps_masks(annotations, use_instance_mask, mask_format, where)
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
    """Detection dataset dict -> grounding input: image, category prompt, Instances.

    Training prompts are the image's categories plus sampled negatives in random order (see
    ``sample_detection_prompt``); boxes whose category does not fit MAX_QUERY_LEN are dropped.
    ``instances.positive_map`` is BOOLEAN (num_boxes, prompt tokens): row i marks the tokens of box
    i's category, the binary form the official loss consumes; ``instances.gt_category_uids`` is each
    box's ``category_uid``, the category's identity across datasets. Test prompts are every category
    in dataset order; when they do not fit one prompt only the first chunk is given here, and
    evaluation runs the other chunks itself. As in Detectron2's DatasetMapper, test outputs carry no
    annotations. The prompt is the output's "prompt" (a ``Prompt``).
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: Sequence[T.Augmentation],
        image_format: str,
        prompt_builder: PromptBuilder,
        class_names: Sequence[str],
        max_negatives: int = 85,
        full_negatives_prob: float = 1.0,
        shuffle_prompt: bool = True,
        use_instance_mask: bool = False,
        instance_mask_format: str = "polygon",
    ):
        if image_format not in ("BGR", "RGB"):
            raise ValueError(f"image_format must be 'BGR' or 'RGB', got {image_format!r}")
        if not class_names:
            raise ValueError("DetectionGroundingMapper: class_names is empty")
        # Every name is checked now, when training starts, not when the final evaluation prompts it.
        prompt_builder.check_vocabulary(class_names, keep_repeats=True)
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.prompt_builder = prompt_builder
        self.names = dict(enumerate(class_names))
        self.label_uids = torch.tensor([category_uid(name) for name in class_names], dtype=torch.long)
        self.max_negatives = max_negatives
        self.full_negatives_prob = full_negatives_prob
        self.shuffle_prompt = shuffle_prompt
        self.use_instance_mask = use_instance_mask
        self.instance_mask_format = instance_mask_format
        self._test_prompt = None if is_train else self._first_test_prompt()

    @classmethod
    def from_config(
        cls,
        cfg: CfgNode,
        is_train: bool = True,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        dataset_names: Sequence[str] | None = None,
    ) -> dict:
        """Pass the model's tokenizer (``model.tokenizer``); without one, the config's is built.

        Category names are the ``thing_classes`` of ``dataset_names``, else of cfg.DATASETS.TRAIN or
        cfg.DATASETS.TEST[0]; several datasets must share them.
        """
        return {
            "is_train": is_train,
            "augmentations": build_detection_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "prompt_builder": PromptBuilder(cfg, tokenizer),
            "class_names": _dataset_classes(cfg, is_train, dataset_names),
            "max_negatives": cfg.DATASETS.MAX_NEGATIVE_CATEGORIES,
            "full_negatives_prob": cfg.DATASETS.FULL_NEGATIVES_PROB,
            "shuffle_prompt": cfg.DATASETS.SHUFFLE_PROMPT,
            "use_instance_mask": cfg.MODEL.MASK_ON,
            "instance_mask_format": cfg.INPUT.MASK_FORMAT,
        }

    def _first_test_prompt(self) -> Prompt:
        """The one prompt every test image shares, built once."""
        chunks = self.prompt_builder.categories(self.names, keep_repeats=True)
        prompt = chunks[0]
        if len(chunks) > 1:
            logger.warning(
                "Test prompt holds the first %d of %d categories (MAX_QUERY_LEN=%d); the rest need the "
                "chunked evaluation",
                len(prompt.label_to_tokens),
                len(self.names),
                self.prompt_builder.max_query_len,
            )
        return prompt

    def _instances(
        self, annotations: list[dict], transforms: T.TransformList, image_hw: tuple[int, int], where: str
    ) -> Instances:
        """Transformed, clipped non-crowd boxes; empty ones (e.g. wholly outside the image) removed."""
        annotations = [obj for obj in annotations if obj.get("iscrowd", 0) == 0]
        instances = transformed_instances(
            annotations, transforms, image_hw, self.use_instance_mask, self.instance_mask_format, where
        )
        return utils.filter_empty_instances(instances)

    def __call__(self, dataset_dict: dict, seed: int | None = None) -> dict:
        """Every random choice of this sample derives from ``seed`` (see ``sample_randomness``)."""
        dataset_dict = copy.deepcopy(dataset_dict)
        with sample_randomness(seed) as rng:
            image, transforms = read_and_augment(dataset_dict, self.image_format, self.augmentations)
        image_hw = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annotations = dataset_dict.pop("annotations", None) or []

        if not self.is_train:
            dataset_dict["prompt"] = self._test_prompt
            return dataset_dict

        where = f"{dataset_dict['file_name']} (image {dataset_dict.get('image_id')})"
        instances = self._instances(annotations, transforms, image_hw, where)
        classes = instances.gt_classes.tolist()
        unknown = sorted(set(classes) - set(self.names))
        if unknown:
            raise ValueError(
                f"{dataset_dict['file_name']}: category ids {unknown} are outside the {len(self.names)} "
                "contiguous ids of the dataset's thing_classes"
            )
        prompt, kept = self.prompt_builder.sample_detection(
            classes,
            self.names,
            rng,
            max_negatives=self.max_negatives,
            full_negatives_prob=self.full_negatives_prob,
            shuffle=self.shuffle_prompt,
        )
        kept_set = set(kept)
        keep = torch.tensor([label in kept_set for label in classes], dtype=torch.bool)
        if not keep.all():
            log_every_n_seconds(
                logging.WARNING,
                f"{dataset_dict['file_name']}: dropped {int((~keep).sum())} boxes whose categories do not "
                f"fit MAX_QUERY_LEN={self.prompt_builder.max_query_len}",
                n=30,
                name=__name__,
            )
            instances = instances[keep]
        instances.positive_map = token_map_to_positive_map(
            prompt.label_to_tokens, instances.gt_classes.tolist(), len(prompt)
        ).bool()
        instances.gt_category_uids = self.label_uids[instances.gt_classes]
        dataset_dict.update(prompt=prompt, instances=instances)
        return dataset_dict
