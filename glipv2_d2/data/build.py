"""Training data loader whose position and augmentation randomness survive a resume exactly.

Detectron2's TrainingSampler restarts its stream on resume and its workers re-seed their RNGs, so a
resumed run sees different images and augmentations than the run it continues. Here every sample
drawn is numbered: draw k of the run reads dataset entry order_epoch(k) and seeds the augmentation
RNGs from (seed, k). Resuming at iteration i restarts the stream at draw i x total batch size, so
an interrupted and an uninterrupted run see identical batches.
"""

import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import build_batch_data_loader, get_detection_dataset_dicts
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler


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


class DrawDataset(Dataset):
    """Maps draw k -> mapper(dataset entry of k), with augmentation RNGs seeded from (seed, k)."""

    def __init__(self, dataset_dicts: list[dict], mapper: Callable[[dict], dict | None], seed: int):
        if not dataset_dicts:
            raise ValueError("the training dataset is empty")
        self.dataset_dicts = dataset_dicts
        self.mapper = mapper
        self.seed = seed
        self._epoch_orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.dataset_dicts)

    def entry_of_draw(self, draw: int) -> int:
        """Dataset index of a draw: each epoch is its own seeded permutation."""
        epoch, position = divmod(draw, len(self.dataset_dicts))
        order = self._epoch_orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset_dicts))
            self._epoch_orders = {epoch: order}
        return int(order[position])

    def __getitem__(self, draw: int) -> dict:
        sample_seed = (self.seed * 1_000_003 + draw) % (2**31)
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        torch.manual_seed(sample_seed)
        entry = self.dataset_dicts[self.entry_of_draw(draw)]
        sample = self.mapper(dict(entry))
        if sample is None:
            raise ValueError(f"the mapper rejected {entry.get('file_name', entry)} (draw {draw})")
        return sample


def build_resumable_train_loader(cfg: CfgNode, mapper: Callable[[dict], dict | None]):
    """Detectron2-style batched loader over cfg.DATASETS.TRAIN with a ResumableDrawSampler.

    Returns (loader, sampler); set `sampler.start` before iterating to resume. Aspect-ratio
    grouping is off: it buffers samples across batches, which would break exact resumption.
    """
    dataset_dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
    )
    sampler = ResumableDrawSampler()
    dataset = DrawDataset(dataset_dicts, mapper, cfg.DATALOADER.SEED)
    loader = build_batch_data_loader(
        dataset,
        sampler,
        cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    return loader, sampler
