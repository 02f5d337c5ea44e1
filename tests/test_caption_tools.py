"""Captioning for users: GLIPv2Predictor.caption(_batch), tools/demo.py --task caption and the
decoding rows of tools/benchmark.py, on a tiny captioning model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tools.demo as demo
from glipv2_d2.engine.predictor import GLIPv2Predictor
from tools.benchmark import main as benchmark_main

from .test_caption_head import caption_cfg
from .tiny_model import tiny_cfg

REPO = Path(__file__).resolve().parents[1]
TINY_CAPTION_OPTS = ["MODEL.GLIPV2.TASK_HEADS", "('CaptionHead',)", "MODEL.CAPTION_ON", "True",
                     "MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS", "2", "INPUT.MIN_SIZE_TEST", "96",
                     "INPUT.MAX_SIZE_TEST", "128"]


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return GLIPv2Predictor(caption_cfg(), batch_size=2)


def scene(height=90, width=120) -> np.ndarray:
    image = np.full((height, width, 3), 200, dtype=np.uint8)
    image[10:50, 20:70] = (0, 0, 255)
    return image


def test_caption_returns_text_score_and_grounded_phrases_in_input_pixels(predictor):
    result = predictor.caption(scene(), max_length=5, min_length=5)
    assert len(result["caption_tokens"]) == 5 and isinstance(result["caption_score"], float)
    assert all(result["caption"][w.span[0]:w.span[1]] == w.text for w in result["caption_words"])
    instances = result["instances"]
    assert instances.image_size == (90, 120) and len(instances) == len(result["caption_phrases"])
    for phrase in result["caption_phrases"]:
        x1, y1, x2, y2 = phrase.box
        assert 0 <= x1 <= x2 <= 120 and 0 <= y1 <= y2 <= 90


def test_batched_captions_equal_one_by_one_and_take_decoding_options(predictor):
    # equal sizes: a smaller image padded in a batch sees other border values, as in detection
    images = [scene(), scene()[:, ::-1].copy(), scene()]
    batched = predictor.caption_batch(images, beam_size=2, max_length=4)
    single = [predictor.caption(image, beam_size=2, max_length=4) for image in images]
    assert [r["caption_tokens"] for r in batched] == [r["caption_tokens"] for r in single]
    assert [r["caption_score"] for r in batched] == pytest.approx([r["caption_score"] for r in single], abs=1e-4)


@pytest.mark.parametrize(
    "options,message",
    [({"max_length": 0}, "max_length must be a positive integer"),
     ({"max_length": 2, "min_length": 3}, "min_length 3 exceeds max_length 2"),
     ({"beam_size": 0}, "beam_size must be a positive integer")],
)
def test_bad_caption_requests_fail_before_the_model_runs(predictor, options, message, monkeypatch):
    monkeypatch.setattr(predictor.model, "generate_captions", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match=message):
        predictor.caption(scene(), **options)


def test_a_model_without_caption_head_says_it_cannot_caption():
    with pytest.raises(ValueError, match="no CaptionHead"):
        GLIPv2Predictor(tiny_cfg()).caption(scene())


def test_demo_caption_task_draws_the_caption_and_writes_its_grounding(tmp_path, capsys):
    image = tmp_path / "in" / "scene.png"
    image.parent.mkdir()
    Image.fromarray(scene()[:, :, ::-1]).save(image)
    out = tmp_path / "out"
    argv = ["--task", "caption", "--config-file", str(REPO / "configs" / "quickstart" / "demo.yaml"), "--cpu",
            "--input", str(image), "--output", str(out), "--max-length", "3", "--min-length", "3", *TINY_CAPTION_OPTS]
    assert demo.main(argv) == 0
    record = json.loads((out / "scene.png.json").read_text())
    assert set(record) == {"image", "caption", "score", "phrases", "words"}
    assert len(record["words"]) >= 1 and all(len(w["box_xyxy"]) == 4 for w in record["words"])
    assert Image.open(out / "scene.png.png").size[0] >= 120
    assert record["caption"] in capsys.readouterr().out


def test_demo_caption_task_takes_no_prompt_and_detection_needs_one(tmp_path):
    common = ["--config-file", "x.yaml", "--builtin-image", "rocket", "--output", str(tmp_path)]
    assert demo.main(["--task", "caption", "--categories", "dog", *common]) == 2
    assert demo.main(common) == 2


def test_benchmark_times_cached_and_recomputed_caption_decoding(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--config-file", str(REPO / "configs" / "quickstart" / "demo.yaml"), "--device", "cpu",
            "--precision", "fp32", "--iters", "1", "--warmup", "0", "--height", "64", "--width", "96",
            "--caption-decoding", "--caption-tokens", "4", "--json", str(out),
            "MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN", "256", "MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS", "2"]
    assert benchmark_main(argv) == 0
    rows = json.loads(out.read_text())["caption_decoding"]
    assert [row["decoding"] for row in rows] == ["cached", "recompute"]
    for row in rows:
        assert row["tokens_per_caption"] == 4 and row["tokens_per_s"] > 0
        assert row["ms_per_caption"] == pytest.approx(1000 * 4 / row["tokens_per_s"])
