"""tools/benchmark.py end to end on CPU, so the GPU benchmark script is known to run before a GPU is booked."""

import json
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from glipv2_d2.checkpoint import CheckpointMismatchError
from glipv2_d2.config import setup_cfg
from tools.benchmark import main

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {"device_name", "torch", "batch_size", "height", "width", "precision", "images_per_s",
            "ms_per_batch_mean", "ms_per_batch_median", "peak_mem_mib", "detections"}


def test_benchmark_writes_one_row_per_precision(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--config-file", str(REPO / "configs" / "quickstart" / "demo.yaml"), "--device", "cpu",
            "--precision", "fp32,bf16,fp16", "--iters", "1", "--warmup", "0", "--height", "64", "--width", "96",
            "--json", str(out), "MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", "256"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert [row["precision"] for row in report["rows"]] == ["fp32", "bf16"]
    assert list(report["skipped"]) == ["fp16"]  # no fp16 autocast on CPU
    for row in report["rows"]:
        assert set(row) == ROW_KEYS
        assert row["images_per_s"] > 0 and row["ms_per_batch_median"] > 0
        assert (row["batch_size"], row["height"], row["width"]) == (1, 64, 96)


def test_benchmark_loads_weights_strictly_and_times_the_models_own_stages(tmp_path):
    config = str(REPO / "configs" / "quickstart" / "demo.yaml")
    state = build_model(setup_cfg(config, ["MODEL.DEVICE", "cpu"])).state_dict()
    complete, partial = tmp_path / "complete.pth", tmp_path / "partial.pth"
    torch.save({"model": state}, complete)
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("head.")}}, partial)
    argv = ["--config-file", config, "--device", "cpu", "--precision", "fp32", "--iters", "1", "--warmup", "0",
            "--height", "64", "--width", "96", "--profile-stages", "MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", "256"]
    out = tmp_path / "bench.json"
    assert main([*argv[:2], "--weights", str(complete), "--json", str(out), *argv[2:]]) == 0
    stages = json.loads(out.read_text())["stages_ms"]
    assert list(stages) == ["preprocess", "backbone", "text encoder", "fusion + head", "post-processing"]
    assert all(ms > 0 for ms in stages.values())
    with pytest.raises(CheckpointMismatchError, match="head.bbox_pred.weight"):
        main([*argv[:2], "--weights", str(partial), *argv[2:]])


def test_lvis_vocabulary_times_every_chunk_with_one_backbone_pass(tmp_path, monkeypatch):
    """--vocabulary lvis: the 1,203 LVIS names (five repeated after cleaning, kept as the official
    evaluation keeps them) in prompts of --chunk-size, each image read with all of them and the
    backbone run once per forward."""
    import tools.benchmark as benchmark

    backbone_calls = []
    original_setup = benchmark.setup

    def counting_setup(args):
        cfg, model = original_setup(args)
        model.backbone.register_forward_hook(lambda *_: backbone_calls.append(1))
        return cfg, model

    monkeypatch.setattr(benchmark, "setup", counting_setup)
    out = tmp_path / "lvis.jsonl"
    argv = ["--config-file", str(REPO / "configs" / "quickstart" / "demo.yaml"), "--device", "cpu",
            "--precision", "fp32", "--iters", "1", "--warmup", "0", "--height", "64", "--width", "96",
            "--vocabulary", "lvis", "--chunk-size", "100", "--json-lines", str(out),
            "MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", "512", "TEST.FUSION_BATCH_MEMORY_MB", "0"]
    assert main(argv) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["vocabulary"], row["names"], row["chunk_size"]) == ("lvis", 1203, 100)
    assert row["chunks"] == 13  # ceil(1203 / 100)
    assert row["ms_per_batch_median"] > 0
    assert backbone_calls == [1]


def test_lvis_vocabulary_refuses_the_coco_only_options():
    with pytest.raises(SystemExit):
        main(["--vocabulary", "lvis", "--peer", "grounding-dino"])
    with pytest.raises(SystemExit):
        main(["--vocabulary", "lvis", "--chunk-size", "0"])
