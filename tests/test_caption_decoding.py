"""Caption decoding: the cached image side and text keys/values give what recomputing the whole
model at every step gives; beam search with one beam is greedy; bad options fail early and clearly."""

import pytest
import torch
from detectron2.modeling import build_model

from glipv2_d2.modeling.caption import (
    CachedCaptionStepper,
    CaptionDecodingOptions,
    RecomputingCaptionStepper,
    beam_search,
    greedy_search,
)

from .test_caption_head import caption_cfg
from .test_training_step import tiny_batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(caption_cfg()).eval()


@pytest.fixture(scope="module")
def batch(model):
    return [{k: v for k, v in x.items() if k != "instances"} | {"height": 256, "width": 192} for x in tiny_batch(model)]


def steppers(model, batch):
    images = model.preprocess_image(batch)
    return CachedCaptionStepper(model, images), RecomputingCaptionStepper(model, images)


def test_cached_decoding_equals_full_recomputation(model, batch):
    head = model.task_heads["CaptionHead"]
    options = CaptionDecodingOptions(max_length=8, min_length=8)  # every step runs: no early end
    cached, recomputed = steppers(model, batch)
    cached_hyps, cached_logits = greedy_search(cached, head, options)
    full_hyps, full_logits = greedy_search(recomputed, head, options)
    assert [h.tokens for h in cached_hyps] == [h.tokens for h in full_hyps]
    assert all(len(h.tokens) == 8 for h in cached_hyps)
    assert cached_logits.shape[:2] == (2, 8)
    finite = torch.isfinite(full_logits)
    assert torch.equal(finite, torch.isfinite(cached_logits))
    torch.testing.assert_close(cached_logits[finite], full_logits[finite], atol=1e-5, rtol=0)
    assert [h.score for h in cached_hyps] == pytest.approx([h.score for h in full_hyps], abs=1e-5)


def test_cached_beam_search_equals_recomputed_beam_search(model, batch):
    head = model.task_heads["CaptionHead"]
    options = CaptionDecodingOptions(beam_size=3, max_length=5, min_length=2, length_penalty=0.5)
    cached, recomputed = steppers(model, batch)
    cached_hyps = beam_search(cached, head, options)
    full_hyps = beam_search(recomputed, head, options)
    assert [h.tokens for h in cached_hyps] == [h.tokens for h in full_hyps]
    assert [h.score for h in cached_hyps] == pytest.approx([h.score for h in full_hyps], abs=1e-5)
    assert all(len(h.tokens) >= 2 for h in cached_hyps)


def test_the_image_side_runs_once_per_batch_with_the_cache(model, batch, monkeypatch):
    calls = []
    original = model.backbone.forward
    monkeypatch.setattr(model.backbone, "forward", lambda x: calls.append(x.shape[0]) or original(x))
    model.generate_captions(batch, CaptionDecodingOptions(beam_size=2, max_length=6, min_length=6), use_cache=True)
    assert calls == [2]
    calls.clear()
    model.generate_captions(batch, CaptionDecodingOptions(max_length=3, min_length=3), use_cache=False)
    assert len(calls) == 1 + 3  # the image side for grounding, then the whole model at every step


@pytest.mark.parametrize("max_length,min_length", [(6, 0), (6, 6), (1, 0)])
def test_beam_search_with_one_beam_is_greedy(model, batch, max_length, min_length):
    head = model.task_heads["CaptionHead"]
    options = CaptionDecodingOptions(beam_size=1, max_length=max_length, min_length=min_length, length_penalty=0.7)
    greedy, _ = greedy_search(CachedCaptionStepper(model, model.preprocess_image(batch)), head, options)
    beam = beam_search(CachedCaptionStepper(model, model.preprocess_image(batch)), head, options)
    assert [(h.tokens, h.ended) for h in beam] == [(h.tokens, h.ended) for h in greedy]
    assert [h.score for h in beam] == pytest.approx([h.score for h in greedy], abs=1e-6)


def test_min_length_holds_back_the_end_token(model, batch):
    head = model.task_heads["CaptionHead"]
    end = head.end_token_id
    # make the end token the most likely one everywhere: captions then stop as soon as allowed
    original_bias = head.lm.bias.detach().clone()
    with torch.no_grad():
        head.lm.bias[end] += 1e4
    try:
        for min_length in (0, 3):
            outputs = model.generate_captions(batch, CaptionDecodingOptions(max_length=6, min_length=min_length))
            assert [len(o["caption_tokens"]) for o in outputs] == [min_length] * 2
            assert all(o["caption_ended"] for o in outputs)
        empty = model.generate_captions(batch, CaptionDecodingOptions(max_length=6))
        assert empty[0]["caption"] == "" and len(empty[0]["instances"]) == 0 and empty[0]["caption_words"] == []
    finally:
        with torch.no_grad():
            head.lm.bias.copy_(original_bias)


def test_generated_captions_come_with_grounded_words_and_phrases(model, batch):
    outputs = model.generate_captions(batch, CaptionDecodingOptions(beam_size=2, max_length=5, min_length=5))
    for output in outputs:
        assert len(output["caption_tokens"]) == 5 and not output["caption_ended"]
        words = output["caption_words"]
        assert words and all(output["caption"][w.span[0]:w.span[1]] == w.text for w in words)
        for grounded in words + output["caption_phrases"]:
            x1, y1, x2, y2 = grounded.box
            assert 0 <= x1 <= x2 <= 192 and 0 <= y1 <= y2 <= 256 and 0 < grounded.score < 1
        instances = output["instances"]
        assert instances.image_size == (256, 192) and len(instances) == len(output["caption_phrases"])


@pytest.mark.parametrize(
    "options,message",
    [
        ({"max_length": 0}, "max_length must be a positive integer"),
        ({"max_length": 3, "min_length": 4}, "min_length 4 exceeds max_length 3"),
        ({"beam_size": 0}, "beam_size must be a positive integer"),
        ({"min_length": -1}, "min_length must be a non-negative integer"),
        ({"length_penalty": float("nan")}, "length_penalty must be finite"),
    ],
)
def test_bad_decoding_options_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        CaptionDecodingOptions(**options)


def test_a_caption_longer_than_the_token_limit_is_refused_before_decoding(model, batch):
    with pytest.raises(ValueError, match="exceeds the text limit of 128 tokens"):
        model.generate_captions(batch, CaptionDecodingOptions(max_length=128))
