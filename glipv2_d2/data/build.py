"""Training data loader whose position and augmentation randomness survive a resume exactly.

Detectron2's TrainingSampler restarts its stream on resume and its workers re-seed their RNGs, so a
resumed run sees different images and augmentations than the run it continues. Here every sample
drawn is numbered: draw k of the run reads the dataset entry of k and hands its mapper the seed
derived from (seed, k), from which every random choice of the sample follows. Resuming at
iteration i restarts the stream at draw i x total batch size, so an interrupted and an
uninterrupted run see identical batches, whatever the number of workers.

cfg.DATASETS.TRAIN may mix datasets of different tasks and vocabularies (detection, grounding,
caption). Each keeps its own records and mapper: a detection set prompts with its own class names,
a grounding or caption set reads its sentences. Which entry draw k reads is a pure function of
(seed, k), so resumption stays exact:

- without DATASETS.TRAIN_RATIOS every entry of every dataset is equally likely: the datasets are
  concatenated and each epoch is one seeded permutation of the whole (for a single dataset, the
  stream of a plain Detectron2 dataset list);
- with ratios, draw k picks dataset i with probability ratios[i] / sum(ratios) from a generator
  seeded by (seed, k), then reads position k of that dataset's own seeded epoch permutations.
"""

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog, build_batch_data_loader
from detectron2.data.build import filter_images_with_only_crowd_annotations, print_instances_class_histogram
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from ..modeling.language import build_tokenizer
from ..utils.seeding import derived_seed
from .caption_mapper import CaptionMapper
from .grounding_mapper import GroundingMapper
from .mappers import DetectionGroundingMapper
from .vqa_mapper import VQAMapper

__all__ = [
    "ConcatenatedOrder",
    "DrawDataset",
    "EpochOrder",
    "RatioOrder",
    "ResumableDrawSampler",
    "TrainSource",
    "build_resumable_train_loader",
    "build_train_mapper",
    "build_train_sources",
    "dataset_task",
    "validated_train_ratios",
]

logger = logging.getLogger(__name__)

TRAIN_TASKS = ("detection", "grounding", "caption", "vqa", "captioning")
# First word of the seeds of RatioOrder's generators: NumPy's SeedSequence pads its entropy with
# zeros, so [seed, k] and [seed, k, 0] would give the same numbers without distinct tags.
_PICK_TAG = 0x5049434B
_ORDER_TAG = 0x4F524452


class Mapper(Protocol):
    """A training mapper: every random choice of the sample derives from `seed`."""

    def __call__(self, dataset_dict: dict, seed: int | None = None) -> dict | None: ...


class ResumableDrawSampler(Sampler[int]):
    """Infinite stream of draw numbers k = start + rank, start + rank + world, ...

    `start` is set by the trainer when it resumes, before the loader's iterator is created.
    """

    def __init__(self, start: int = 0):
        self.start = start
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()

    def __iter__(self) -> Iterator[int]:
        draw = self.start + self.rank
        while True:
            yield draw
            draw += self.world_size


@dataclass(frozen=True)
class TrainSource:
    """One training dataset: its registered name, its records and the mapper of its task."""

    name: str
    dataset_dicts: list[dict]
    mapper: Mapper


class EpochOrder:
    """Position k -> index into `size` items; each epoch is its own permutation seeded by (*key, epoch)."""

    def __init__(self, size: int, key: Sequence[int]):
        self.size = size
        self.key = list(key)
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            self._order = np.random.default_rng([*self.key, epoch]).permutation(self.size)
            self._epoch = epoch
        return int(self._order[offset])


class ConcatenatedOrder:
    """Draw k -> (dataset, entry), every entry of every dataset equally likely: the datasets are
    concatenated and each epoch is a permutation of the whole, so every entry is read once per epoch."""

    def __init__(self, sizes: Sequence[int], seed: int):
        self._offsets = np.cumsum([0, *sizes])
        self._order = EpochOrder(int(self._offsets[-1]), (seed,))

    def __call__(self, draw: int) -> tuple[int, int]:
        flat = self._order(draw)
        dataset = int(np.searchsorted(self._offsets, flat, side="right")) - 1
        return dataset, flat - int(self._offsets[dataset])


class RatioOrder:
    """Draw k -> (dataset, entry) with dataset i drawn with probability ratios[i] / sum(ratios).

    The dataset comes from a generator seeded by (seed, k); the entry is position k of that
    dataset's own epoch permutations. Both are pure functions of (seed, k), so no state is carried
    from draw to draw. Within a dataset, entries are uniform over the run but not read exactly once
    per epoch (only the draws that pick the dataset read its permutation).
    """

    def __init__(self, sizes: Sequence[int], ratios: Sequence[float], seed: int):
        self.seed = seed
        total = float(sum(ratios))
        self.probabilities = np.array([ratio / total for ratio in ratios])
        self._orders = [EpochOrder(size, (_ORDER_TAG, seed, index)) for index, size in enumerate(sizes)]

    def dataset_of_draw(self, draw: int) -> int:
        rng = np.random.default_rng([_PICK_TAG, self.seed, draw])
        return int(rng.choice(len(self.probabilities), p=self.probabilities))

    def __call__(self, draw: int) -> tuple[int, int]:
        dataset = self.dataset_of_draw(draw)
        return dataset, self._orders[dataset](draw)


class DrawDataset(Dataset):
    """Maps draw k -> the mapped entry of k (tagged with its "dataset_name"), mapped with the seed
    derived from (seed, k); no global generator is touched. See the module docstring for how the
    entry is chosen."""

    def __init__(self, sources: Sequence[TrainSource], seed: int, ratios: Sequence[float] = ()):
        if not sources:
            raise ValueError("no training dataset given (cfg.DATASETS.TRAIN is empty)")
        empty = [source.name for source in sources if not source.dataset_dicts]
        if empty:
            raise ValueError(f"training datasets {empty} are empty")
        self.sources = list(sources)
        self.seed = seed
        ratios = validated_train_ratios(ratios, [source.name for source in self.sources])
        sizes = [len(source.dataset_dicts) for source in self.sources]
        if ratios and len(sizes) > 1:
            self.order: Callable[[int], tuple[int, int]] = RatioOrder(sizes, ratios, seed)
        else:
            self.order = ConcatenatedOrder(sizes, seed)

    def __len__(self) -> int:
        return sum(len(source.dataset_dicts) for source in self.sources)

    def __getitem__(self, draw: int) -> dict:
        dataset, index = self.order(draw)
        source = self.sources[dataset]
        entry = source.dataset_dicts[index]
        sample = source.mapper(dict(entry), seed=derived_seed(self.seed, draw))
        if sample is None:
            raise ValueError(f"the mapper of {source.name!r} rejected {entry.get('file_name', entry)} (draw {draw})")
        sample["dataset_name"] = source.name
        return sample


def validated_train_ratios(ratios: Sequence[float], names: Sequence[str]) -> list[float]:
    """DATASETS.TRAIN_RATIOS as floats, checked against the training datasets' names before any data is loaded."""
    ratios = [float(ratio) for ratio in ratios]
    if not ratios:
        return []
    if len(ratios) != len(names):
        raise ValueError(
            f"DATASETS.TRAIN_RATIOS has {len(ratios)} entries {ratios} for the {len(names)} training datasets "
            f"{list(names)}; give one ratio per dataset (or none for size-proportional sampling)"
        )
    bad = {name: ratio for name, ratio in zip(names, ratios) if not (math.isfinite(ratio) and ratio >= 0)}
    if bad:
        raise ValueError(f"DATASETS.TRAIN_RATIOS must be finite and >= 0; got {bad}")
    if sum(ratios) == 0:
        raise ValueError(f"DATASETS.TRAIN_RATIOS {ratios} are all 0: no dataset could be drawn")
    return ratios


def dataset_task(name: str, dataset_dicts: Sequence[dict]) -> str:
    """The one task of a (non-empty) training dataset's records ("detection" when they carry none)."""
    tasks = sorted({record.get("task", "detection") for record in dataset_dicts})
    if len(tasks) > 1:
        raise ValueError(f"training dataset {name!r} mixes tasks {tasks}; register one dataset per task")
    if tasks[0] not in TRAIN_TASKS:
        raise ValueError(f"training dataset {name!r} has task {tasks[0]!r}; training supports {list(TRAIN_TASKS)}")
    return tasks[0]


def _prepared_detection_dicts(name: str, dataset_dicts: list[dict], filter_empty: bool) -> list[dict]:
    """What Detectron2's get_detection_dataset_dicts does to one dataset: drop images without a
    non-crowd box when filter_empty, and log the class histogram."""
    has_instances = "annotations" in dataset_dicts[0]
    if filter_empty and has_instances:
        dataset_dicts = filter_images_with_only_crowd_annotations(dataset_dicts)
    if not dataset_dicts:
        raise ValueError(f"training dataset {name!r} has no image with a non-crowd box (FILTER_EMPTY_ANNOTATIONS)")
    class_names = MetadataCatalog.get(name).get("thing_classes")
    if has_instances and class_names:
        print_instances_class_histogram(dataset_dicts, class_names)
    return dataset_dicts


def build_train_mapper(
    cfg: CfgNode, dataset_name: str, task: str, tokenizer: PreTrainedTokenizerBase | None = None
) -> Mapper:
    """The training mapper of one dataset: detection sets prompt with their own class names
    (contiguous ids differ between datasets), grounding and caption sets read their sentences, VQA
    sets their questions."""
    if task == "detection":
        return DetectionGroundingMapper(cfg, is_train=True, tokenizer=tokenizer, dataset_names=[dataset_name])
    if task in ("grounding", "caption"):
        return GroundingMapper(cfg, is_train=True, tokenizer=tokenizer)
    if task == "vqa":
        return VQAMapper(cfg, is_train=True, tokenizer=tokenizer)
    if task == "captioning":  # image-caption pairs without boxes, for the language model (caption mode)
        return CaptionMapper(cfg, is_train=True, tokenizer=tokenizer)
    raise ValueError(f"no training mapper for task {task!r} of dataset {dataset_name!r}")


def build_train_sources(cfg: CfgNode, tokenizer: PreTrainedTokenizerBase | None = None) -> list[TrainSource]:
    """Every dataset of cfg.DATASETS.TRAIN loaded on its own (their vocabularies may differ), with
    the mapper of its task; all mappers share one tokenizer."""
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER)
    sources = []
    for name in cfg.DATASETS.TRAIN:
        dataset_dicts = DatasetCatalog.get(name)
        if not dataset_dicts:
            raise ValueError(f"training dataset {name!r} is empty")
        task = dataset_task(name, dataset_dicts)
        if task == "detection":
            dataset_dicts = _prepared_detection_dicts(name, dataset_dicts, cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        mapper = build_train_mapper(cfg, name, task, tokenizer)
        if isinstance(mapper, VQAMapper):
            mapper.report_unknown_answers(name, dataset_dicts)
        sources.append(TrainSource(name, dataset_dicts, mapper))
        logger.info("training dataset %s: %d %s records", name, len(dataset_dicts), task)
    return sources


def _log_shares(dataset: DrawDataset) -> None:
    if isinstance(dataset.order, RatioOrder):
        shares = dataset.order.probabilities
    else:
        shares = np.array([len(source.dataset_dicts) for source in dataset.sources]) / len(dataset)
    for source, share in zip(dataset.sources, shares):
        logger.info("training draws from %s: %.1f%%", source.name, 100 * share)


def build_resumable_train_loader(
    cfg: CfgNode, sources: Sequence[TrainSource] | None = None
) -> tuple[DataLoader, ResumableDrawSampler]:
    """Detectron2-style batched loader over cfg.DATASETS.TRAIN with a ResumableDrawSampler.

    `sources` replaces the datasets and mappers built from cfg (``build_train_sources``), e.g. to
    use custom mappers (called as ``mapper(dataset_dict, seed=...)``, see ``Mapper``). Returns (loader,
    sampler); set `sampler.start` before iterating to resume.
    Aspect-ratio grouping is off: it buffers samples across batches, which would break exact
    resumption. The loader seeds its workers from its own generator rather than from torch's global
    one, which the per-iteration seed hook has just set for the model's dropout.
    """
    names = [source.name for source in sources] if sources is not None else list(cfg.DATASETS.TRAIN)
    ratios = validated_train_ratios(cfg.DATASETS.TRAIN_RATIOS, names)
    if sources is None:
        sources = build_train_sources(cfg)
    sampler = ResumableDrawSampler()
    dataset = DrawDataset(sources, cfg.DATALOADER.SEED, ratios)
    _log_shares(dataset)
    loader = build_batch_data_loader(
        dataset,
        sampler,
        cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        seed=cfg.DATALOADER.SEED,
    )
    return loader, sampler
