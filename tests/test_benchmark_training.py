"""tools/benchmark.py --train on the tiny quick-start model: training steps with the real loss, the data
loader's time, and gradient checkpointing that leaves losses and gradients unchanged."""

import json
import math
from pathlib import Path

import pytest
import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage

from glipv2_d2.benchmarking.training import (
    build_training,
    checkpointing_cfg,
    grad_scaler,
    register_synthetic_coco,
    seed_step,
    time_data_loader,
    train_step,
    training_batch,
)
from glipv2_d2.data.datasets.catalog import unregister_dataset
from tools.benchmark import main

from .tiny_model import tiny_cfg

REPO = Path(__file__).resolve().parents[1]
TINY = ["MODEL.LANGUAGE_BACKBONE.LOAD_PRETRAINED", "False", "MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS", "2",
        "DATALOADER.NUM_WORKERS", "1"]
ROW_KEYS = {"device_name", "torch", "batch_size", "height", "width", "warmup", "iters", "precision", "checkpointing",
            "images_per_s", "ms_per_step_median", "ms_per_step_mean", "peak_mem_mib", "saved_activations_mib",
            "loss_first", "loss_last", "data_ms_per_batch", "data_bound"}


def train_argv(*extra: str) -> list[str]:
    """128x128, not smaller: at 64x64 the FPN's P6 is 1x1, and torch 2.14's CPU bf16 weight gradient of a
    stride-2 3x3 conv (P7) on a 1x1 input reads uninitialised memory, so bf16 losses turned NaN at random."""
    return ["--train", "--config-file", str(REPO / "configs" / "quickstart" / "demo.yaml"), "--device", "cpu",
            "--batch-size", "1", "--height", "128", "--width", "128", "--iters", "2", "--warmup", "0",
            "--data-batches", "2", *extra]


def test_train_rows_are_finite_and_checkpointing_keeps_the_first_loss(tmp_path, single_thread):
    out, lines = tmp_path / "train.json", tmp_path / "train.jsonl"
    argv = train_argv("--precision", "fp32,bf16,fp16", "--checkpointing", "none,fusion", "--json", str(out),
                      "--json-lines", str(lines), "MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", "256", *TINY)
    assert main(argv) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["checkpointing"], r["precision"]) for r in rows] == [
        ("none", "fp32"), ("none", "bf16"), ("fusion", "fp32"), ("fusion", "bf16")]
    assert list(report["skipped"]) == ["fp16"]  # no fp16 autocast on CPU
    for row in rows:
        assert set(row) == ROW_KEYS
        assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
        assert row["images_per_s"] > 0 and row["ms_per_step_median"] > 0 and row["data_ms_per_batch"] > 0
    first = {(r["checkpointing"], r["precision"]): r["loss_first"] for r in rows}
    kept = {(r["checkpointing"], r["precision"]): r["saved_activations_mib"] for r in rows}
    for precision in ("fp32", "bf16"):
        assert first["fusion", precision] == pytest.approx(first["none", precision], abs=1e-5)
        assert 0 < kept["fusion", precision] < 0.8 * kept["none", precision]
    data = report["data_loader"]
    assert data["num_workers"] == 1 and data["data_ms_per_batch"] > 0 and data["data_first_batch_ms"] > 0
    tables = [json.loads(line)["table"] for line in lines.read_text().splitlines()]
    assert tables == ["training"] * 4 + ["data_loader"]


def test_train_refuses_a_prompt_without_all_coco_names(capsys):
    assert main(train_argv("--precision", "fp32", *TINY)) == 1  # the quick start's 128 tokens hold fewer
    assert "MAX_QUERY_LEN 256" in capsys.readouterr().err


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    name = register_synthetic_coco(tmp_path_factory.mktemp("coco"), 2, 64, 64)
    yield name
    unregister_dataset(name)


@pytest.fixture
def cfg():
    cfg = tiny_cfg()
    cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN = 256
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


def first_step(cfg, batch, setting: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the first fp32 training step with one checkpointing setting."""
    state = build_training(checkpointing_cfg(cfg, setting))
    seed_step(cfg.DATALOADER.SEED, 0)
    loss = train_step(state, batch, "cpu", None, grad_scaler("cpu", None))
    return loss, {name: p.grad.clone() for name, p in state.model.named_parameters() if p.grad is not None}


def test_checkpointing_leaves_loss_and_gradients_unchanged(cfg, synthetic_set, single_thread):
    """fp32 (bf16 losses are compared end to end above; a bf16 step is slow on CPUs without bf16 units)."""
    batch = training_batch(cfg, synthetic_set, 1)
    loss, grads = first_step(cfg, batch, "none")
    checkpointed_loss, checkpointed_grads = first_step(cfg, batch, "all")
    assert checkpointed_loss == pytest.approx(loss, abs=1e-5)
    assert checkpointed_grads.keys() == grads.keys()
    inside_each_part = ("fusion.layers.0.", "backbone.bottom_up.layers.0.", "language_backbone.model.encoder.layer.0.")
    for prefix in inside_each_part:
        name = next(n for n in grads if n.startswith(prefix))
        torch.testing.assert_close(checkpointed_grads[name], grads[name], rtol=1e-5, atol=1e-8)


def test_train_step_is_the_trainers_step(cfg, synthetic_set, single_thread):
    """fp32: the benchmark's step changes the weights as Detectron2's SimpleTrainer.run_step does."""
    batch = training_batch(cfg, synthetic_set, 1)
    ours, theirs = build_training(cfg), build_training(cfg)
    seed_step(cfg.DATALOADER.SEED, 0)
    train_step(ours, batch, "cpu", None, grad_scaler("cpu", None))
    seed_step(cfg.DATALOADER.SEED, 0)
    with EventStorage():
        SimpleTrainer(theirs.model, [batch], theirs.optimizer).run_step()
    for (name, mine), other in zip(ours.model.named_parameters(), theirs.model.parameters()):
        torch.testing.assert_close(mine, other, rtol=0, atol=0, msg=name)


def test_data_loader_time_is_positive(cfg, synthetic_set):
    data = time_data_loader(cfg, synthetic_set, 2, 2)
    assert data["data_ms_per_batch"] > 0 and data["data_first_batch_ms"] > 0 and data["num_workers"] == 0
