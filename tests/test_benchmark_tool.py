"""tools/benchmark.py end to end on CPU, so the GPU benchmark script is known to run before a GPU is booked."""

import json
from pathlib import Path

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
