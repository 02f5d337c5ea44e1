"""TEST.COMPILE_FUSION: the tower + head through torch.compile at inference, eager when that fails."""

import copy
import logging

import pytest
import torch
from detectron2.modeling import build_model

from glipv2_d2.data.prompt_builder import PromptBuilder
from glipv2_d2.modeling.compiled_fusion import CompiledFusion

from .tiny_model import tiny_cfg


def _model(mode: str):
    cfg = tiny_cfg()
    cfg.TEST.COMPILE_FUSION = mode
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _inputs(model, size: tuple[int, int] = (96, 128), names: tuple[str, ...] = ("cat", "dog", "traffic light")):
    prompt = PromptBuilder(model.tokenizer).categories(list(names))[0]
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, *size), generator=generator, dtype=torch.uint8), "prompt": prompt}]


def test_compiled_inference_equals_eager(single_thread):
    """Inductor on the CPU: same detections as the eager model with the same weights, also for a
    second image size and prompt length (recompiled, as evaluation meets them)."""
    eager, compiled = _model(""), _model("default")
    compiled.load_state_dict(eager.state_dict())
    for inputs in (_inputs(eager), _inputs(eager, (128, 96), ("person", "bicycle"))):
        with torch.no_grad():
            expected = eager(inputs)[0]["instances"]
            got = compiled(inputs)[0]["instances"]
        assert compiled.compiled_fusion.active and compiled.compiled_fusion.compiled is not None
        assert len(got) == len(expected) > 0
        torch.testing.assert_close(got.scores, expected.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(got.pred_classes, expected.pred_classes)


def test_a_failing_compile_falls_back_to_eager_once(monkeypatch, caplog):
    calls = {"compile": 0, "compiled": 0}

    def broken_compile(function, mode):
        calls["compile"] += 1

        def run(*args, **kwargs):
            calls["compiled"] += 1
            raise RuntimeError("backend exploded\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fused = CompiledFusion(lambda x: 2 * x, "max-autotune")
    with caplog.at_level(logging.WARNING):
        assert fused(torch.tensor(3.0)) == 6.0
        assert fused(torch.tensor(4.0)) == 8.0
    assert calls == {"compile": 1, "compiled": 1} and not fused.active
    assert "TEST.COMPILE_FUSION 'max-autotune' failed (RuntimeError: backend exploded)" in caplog.text


def test_training_and_the_empty_mode_never_compile(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled"))
    model = _model("")
    with torch.no_grad():
        assert len(model(_inputs(model))[0]["instances"]) > 0
    assert not model.compiled_fusion.active
    compiled = _model("default")
    images = compiled.preprocess_image(_inputs(compiled))
    text = compiled.encode_text([_inputs(compiled)[0]["prompt"]])
    compiled.train()
    assert len(compiled.run_network(images, text).logits) == 5
    assert compiled.compiled_fusion.compiled is None


def test_a_copied_model_compiles_its_own_modules():
    """EMA copies the model: the copy's compiled function must run the copy's weights."""
    model = _model("default")
    clone = copy.deepcopy(model)
    assert clone.compiled_fusion.function.__self__ is clone
    assert clone.compiled_fusion.mode == "default" and clone.compiled_fusion.compiled is None


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="TEST.COMPILE_FUSION must be one of .*'fast'"):
        CompiledFusion(lambda: None, "fast")
