"""Training throughput for tools/benchmark.py ``--train``: full steps with the real GLIPv2 loss, and
the time the project's training data loader needs for a batch of the same size.

A step is what GLIPv2Trainer runs each iteration: forward with the grounding losses (plus L_inter,
L_mlm and task-head losses when the config enables them), backward, the project's optimizer (AdamW
groups, full-model gradient clipping), the LR schedule and the EMA update when SOLVER.EMA is on.
Mixed precision is AMPTrainer's recipe: forward and loss under autocast, a GradScaler that scales
the loss only for fp16 (bfloat16 has float32's range). Detectron2's AMPTrainer asserts CUDA and
uses torch.cuda.amp.autocast, so ``train_step`` runs the same steps with torch.autocast on the
device at hand; fp32 is SimpleTrainer's step (the scaler is then disabled and changes nothing).

Inputs are synthetic but go through the project's data path: random images written as JPEGs at the
network input size with a few random boxes of COCO categories (a COCO-format json registered like
DATASETS.REGISTER sets), mapped by DetectionGroundingMapper without augmentation and with every one
of the 80 COCO names in the prompt, so positive maps and category uids are the mapper's own.
The data time runs the real training loader (cfg's mapper, augmentations and DATALOADER.NUM_WORKERS)
over the same files.

Gradient checkpointing settings (``CHECKPOINTING``) set MODEL.DYHEAD.USE_CHECKPOINT (every fusion
layer), MODEL.SWIN.USE_CHECKPOINT (every Swin block) and MODEL.LANGUAGE_BACKBONE.USE_CHECKPOINT
(every text-encoder layer), one at a time or all three.

Example (GPU, GLIP-T, the issue's target: batch 4 bf16 >= 15 images/s at <= 35 GB):
  python tools/benchmark.py --train --config-file configs/glipv2_T.yaml --batch-size 4 \\
      --precision fp32,bf16,fp16 --checkpointing none,fusion,backbone,text,all --iters 10 --warmup 3 \\
      --json-lines out/train_T_b4.jsonl
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from PIL import Image
from torch import nn

from ..checkpoint import GLIPv2Checkpointer
from ..data.build import build_resumable_train_loader
from ..data.datasets.catalog import unregister_dataset
from ..data.datasets.coco_lvis import register_grounding_coco
from ..data.mappers import DetectionGroundingMapper
from ..data.prompt_builder import PromptBuilder
from ..engine.ema import ModelEMA
from ..engine.trainer import GLIPv2Trainer
from ..utils.seeding import derived_seed
from .saved_activations import SavedActivations
from .timing import synchronize

COCO_NAMES = [c["name"] for c in COCO_CATEGORIES if c["isthing"] == 1]
# Config keys of each gradient-checkpointing setting: one part (fusion tower, Swin backbone, text
# encoder) or all three.
_CHECKPOINTED_PARTS = {
    "fusion": "MODEL.DYHEAD.USE_CHECKPOINT",
    "backbone": "MODEL.SWIN.USE_CHECKPOINT",
    "text": "MODEL.LANGUAGE_BACKBONE.USE_CHECKPOINT",
}


def _checkpointed(*parts: str) -> dict[str, bool]:
    return {key: part in parts for part, key in _CHECKPOINTED_PARTS.items()}


CHECKPOINTING: dict[str, dict[str, bool]] = {
    "none": _checkpointed(),
    "fusion": _checkpointed("fusion"),
    "backbone": _checkpointed("backbone"),
    "text": _checkpointed("text"),
    "all": _checkpointed(*_CHECKPOINTED_PARTS),
}
DATASET_NAME = "glipv2_benchmark_synthetic_coco"
BOXES_PER_IMAGE = 6  # a few objects per image (COCO train averages about 7)
MIB = 2**20


def write_synthetic_coco(folder: Path, num_images: int, height: int, width: int, seed: int = 0) -> Path:
    """COCO-format json and JPEGs under ``folder``: smooth random images of height x width, each with
    BOXES_PER_IMAGE random boxes (1/10 to 1/2 of the image side) of random COCO categories.

    JPEG, as COCO's images are, so that the data time includes decoding a realistic file."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
        pixels = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
        file_name = f"{image_id:06d}.jpg"
        Image.fromarray(pixels).save(folder / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for _ in range(BOXES_PER_IMAGE):
            w, h = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(rng.integers(1, 81)),
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],  # mask configs train their head too
            })
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(COCO_NAMES)]
    json_file = folder / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return json_file


def register_synthetic_coco(folder: Path, num_images: int, height: int, width: int, seed: int = 0) -> str:
    """Write the synthetic set and register it as DATASETS.REGISTER registers COCO-format sets."""
    json_file = write_synthetic_coco(folder, num_images, height, width, seed)
    unregister_dataset(DATASET_NAME)
    register_grounding_coco(DATASET_NAME, str(json_file), str(folder))
    return DATASET_NAME


def training_batch(cfg: CfgNode, dataset_name: str, batch_size: int) -> list[dict]:
    """The first ``batch_size`` images of the set as the training mapper gives them, with the prompt
    holding all 80 COCO names (shuffled as DATASETS.SHUFFLE_PROMPT says) and no augmentation, so the
    network sees the images at their written size."""
    mapper = DetectionGroundingMapper(
        True,
        augmentations=[],
        image_format=cfg.INPUT.FORMAT,
        prompt_builder=PromptBuilder(cfg),  # the config's tokenizer, which the model builds too
        class_names=MetadataCatalog.get(dataset_name).thing_classes,
        max_negatives=len(COCO_NAMES),
        full_negatives_prob=1.0,
        shuffle_prompt=cfg.DATASETS.SHUFFLE_PROMPT,
        use_instance_mask=cfg.MODEL.MASK_ON,
        instance_mask_format=cfg.INPUT.MASK_FORMAT,
    )
    records = DatasetCatalog.get(dataset_name)[:batch_size]
    batch = [mapper(record, seed=derived_seed(cfg.DATALOADER.SEED, i)) for i, record in enumerate(records)]
    held = min(len(x["prompt"].label_to_tokens) for x in batch)
    if held < len(COCO_NAMES):
        raise ValueError(
            f"a training prompt holds {held} of the {len(COCO_NAMES)} COCO names within "
            f"{cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN} tokens, but the benchmark trains with all of them: "
            "add MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN 256"
        )
    return batch


def checkpointing_cfg(cfg: CfgNode, setting: str) -> CfgNode:
    """``cfg`` with the gradient-checkpointing keys of ``setting``."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list([item for key, value in CHECKPOINTING[setting].items() for item in (key, value)])
    cfg.freeze()
    return cfg


@dataclass
class TrainingState:
    """What GLIPv2Trainer steps each iteration, built by its own class methods."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: ModelEMA | None


def build_training(cfg: CfgNode, weights: str = "", seed: int = 0) -> TrainingState:
    """Model (frozen parts as configured), optimizer and LR schedule as GLIPv2Trainer builds them;
    seeded, so that every setting of one run starts from the same random weights."""
    torch.manual_seed(seed)
    model = GLIPv2Trainer.build_model(cfg).train()
    if weights:
        GLIPv2Checkpointer(model, strict=True, trust_pickle=cfg.MODEL.TRUST_PICKLED_WEIGHTS).load(weights)
    optimizer = GLIPv2Trainer.build_optimizer(cfg, model)
    ema = ModelEMA(model, cfg.SOLVER.EMA.DECAY) if cfg.SOLVER.EMA.ENABLED else None
    return TrainingState(model, optimizer, GLIPv2Trainer.build_lr_scheduler(cfg, optimizer), ema)


def grad_scaler(device: str, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """GLIPv2Trainer's scaler: loss scaling for float16 only."""
    return torch.amp.GradScaler(device, enabled=dtype == torch.float16)


def seed_step(seed: int, step: int) -> None:
    """The trainer's PerIterationSeed (one process): dropout, drop path and MLM masking draw the same
    numbers at a step whatever the checkpointing, so settings compare equal losses."""
    step_seed = derived_seed(seed, step)
    random.seed(step_seed)
    np.random.seed(step_seed)
    torch.manual_seed(step_seed)


def train_step(state: TrainingState, batch: list[dict], device: str, dtype: torch.dtype | None,
               scaler: torch.amp.GradScaler, around_forward: AbstractContextManager | None = None) -> float:
    """One iteration as AMPTrainer.run_step (SimpleTrainer.run_step in fp32) and the trainer's
    LR-scheduler and EMA hooks do it; returns the total loss, which the trainer reads every step.
    ``around_forward`` wraps the forward and loss alone (a meter of what they save for backward)."""
    with around_forward or nullcontext(), torch.autocast(device, dtype=dtype) if dtype else nullcontext():
        losses = sum(state.model(batch).values())
    state.optimizer.zero_grad()
    scaler.scale(losses).backward()
    loss = losses.item()
    scaler.step(state.optimizer)
    scaler.update()
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update(state.model)
    return loss


def _current_rss() -> int:
    """Resident bytes of this process now (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def rss_peak(interval_s: float = 0.005) -> Iterator[dict]:
    """Yields a dict whose "growth_mib" is, after the block, the highest resident memory sampled
    during it minus that at its start. ru_maxrss never goes down, so it cannot show that a later
    setting (checkpointing) needs less than an earlier one."""
    start = peak = _current_rss()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(interval_s):
            peak = max(peak, _current_rss())

    result: dict = {}
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["growth_mib"] = (max(peak, _current_rss()) - start) / MIB


def memory_meter(device: str) -> AbstractContextManager[dict]:
    """Peak memory of a block: CUDA max allocated (weights included), or sampled RSS growth on CPU."""
    if device != "cuda":
        return rss_peak()

    @contextmanager
    def cuda_peak() -> Iterator[dict]:
        result: dict = {}
        torch.cuda.reset_peak_memory_stats()
        yield result
        result["growth_mib"] = torch.cuda.max_memory_allocated() / MIB

    return cuda_peak()



def time_training(state: TrainingState, batch: list[dict], device: str, dtype: torch.dtype | None, iters: int,
                  warmup: int, seed: int) -> dict:
    """``warmup`` untimed then ``iters`` timed steps on ``batch``: images/s, ms per step, the peak
    memory over all steps (the first creates the optimizer state), the activations the first step's
    forward kept for backward (the meter slows that step, so keep a warm-up) and the first and last
    losses."""
    scaler = grad_scaler(device, dtype)
    times, losses = [], []
    activations = SavedActivations(state.model)
    with memory_meter(device) as memory:
        for step in range(warmup + iters):
            seed_step(seed, step)
            synchronize(device)
            start = time.perf_counter()
            meter = activations if step == 0 else None
            losses.append(train_step(state, batch, device, dtype, scaler, meter))
            synchronize(device)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    return {
        "images_per_s": len(batch) * iters / sum(times),
        "ms_per_step_median": 1000 * statistics.median(times),
        "ms_per_step_mean": 1000 * statistics.fmean(times),
        "peak_mem_mib": memory["growth_mib"],
        "saved_activations_mib": activations.mib,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def time_data_loader(cfg: CfgNode, dataset_name: str, batch_size: int, batches: int) -> dict:
    """ms per batch of ``batch_size`` that the real training loader (cfg's mapper, augmentations and
    DATALOADER.NUM_WORKERS) delivers to a consumer that waits for nothing, over ``batches`` batches
    after a first one that also starts the workers."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TRAIN, cfg.DATASETS.TRAIN_RATIOS, cfg.SOLVER.IMS_PER_BATCH = (dataset_name,), [], batch_size
    loader, _ = build_resumable_train_loader(cfg)
    stream = iter(loader)
    start = time.perf_counter()
    next(stream)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    seconds = time.perf_counter() - start
    del stream  # stops the workers
    return {"data_ms_per_batch": 1000 * seconds / batches, "data_first_batch_ms": 1000 * first,
            "num_workers": cfg.DATALOADER.NUM_WORKERS, "data_batches": batches}


def release(device: str) -> None:
    """Return the previous setting's memory before the next one is measured. On the CPU glibc keeps
    freed heap pages resident, which would hide the next setting's growth, so they are trimmed."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    else:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def run(cfg: CfgNode, precisions: dict[str, torch.dtype | None], checkpointing: list[str], batch_size: int,
        height: int, width: int, iters: int, warmup: int, data_batches: int, weights: str = "") -> tuple[list, dict]:
    """One row per (checkpointing, precision), each from freshly built, identically seeded training
    state, and the data-loader timing; rows carry the data time and whether it exceeds the step."""
    device = cfg.MODEL.DEVICE
    seed = cfg.DATALOADER.SEED
    with tempfile.TemporaryDirectory(prefix="glipv2_train_bench_") as folder:
        name = register_synthetic_coco(Path(folder), batch_size * (data_batches + 1), height, width, seed)
        try:
            batch = training_batch(cfg, name, batch_size)
            rows = []
            for setting in checkpointing:
                for precision, dtype in precisions.items():
                    state = build_training(checkpointing_cfg(cfg, setting), weights, seed)
                    release(device)
                    print(f"training {precision}, checkpointing {setting} ...", flush=True)
                    timing = time_training(state, batch, device, dtype, iters, warmup, seed)
                    rows.append({"precision": precision, "checkpointing": setting, **timing})
                    del state
            data = time_data_loader(cfg, name, batch_size, data_batches)
        finally:
            unregister_dataset(name)
    for row in rows:
        row.update(data_ms_per_batch=data["data_ms_per_batch"],
                   data_bound=data["data_ms_per_batch"] > row["ms_per_step_median"])
    return rows, data


def markdown_table(rows: list[dict], memory_label: str) -> str:
    header = ["device", "precision", "checkpointing", "batch", "input (HxW)", "images/s", "ms/step median",
              "data ms/batch", "data-bound", memory_label, "activations kept for backward (MiB)", "loss first",
              "loss last"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["device_name"], r["precision"], r["checkpointing"], str(r["batch_size"]),
                 f"{r['height']}x{r['width']}", f"{r['images_per_s']:.2f}", f"{r['ms_per_step_median']:.1f}",
                 f"{r['data_ms_per_batch']:.1f}", "yes" if r["data_bound"] else "no", f"{r['peak_mem_mib']:.0f}",
                 f"{r['saved_activations_mib']:.0f}", f"{r['loss_first']:.4f}", f"{r['loss_last']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
