"""Caption mode: the text is causal, the image never reads it, the head learns the next token, and
the detection mode the same model runs in stays as it was."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model

from glipv2_d2.modeling.caption import CaptionHead, next_token_labels
from glipv2_d2.modeling.meta_arch import EncodedText
from glipv2_d2.modeling.mlm import IGNORE_INDEX

from .test_training_step import tiny_batch
from .tiny_model import tiny_cfg


def caption_cfg():
    cfg = tiny_cfg()
    cfg.MODEL.GLIPV2.TASK_HEADS = ["CaptionHead"]
    cfg.MODEL.CAPTION_ON = True
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(caption_cfg()).eval()


def run_text(model, batch, token_ids, caption_mode=True):
    """Fused image levels and next-token logits of ``token_ids`` (B, T) over the batch's images."""
    images = model.preprocess_image(batch)
    mask = torch.ones_like(token_ids)
    hidden = model.language_backbone(token_ids, mask, causal=caption_mode)["hidden"]
    text = EncodedText(hidden=hidden, mask=mask, token_categories=torch.full_like(token_ids, -1))
    outputs = model.run_network(images, text, caption_mode=caption_mode)
    logits = model.task_heads["CaptionHead"].logits(outputs.text)
    return outputs.features, logits.masked_fill(torch.isinf(logits), 0.0)  # banned special tokens: -inf


def two_texts(model):
    first = torch.tensor([[model.tokenizer.cls_token_id, 2417, 4418, 2682, 1037, 2630, 2675]] * 2)
    second = first.clone()
    second[:, 4:] = torch.tensor([1996, 3756, 9546])  # same first four tokens, another future
    return first, second


@torch.no_grad()
def test_future_tokens_leave_earlier_logits_unchanged(model):
    batch = tiny_batch(model)
    first, second = two_texts(model)
    _, logits_first = run_text(model, batch, first)
    _, logits_second = run_text(model, batch, second)
    torch.testing.assert_close(logits_first[:, :4], logits_second[:, :4], atol=1e-5, rtol=0)
    assert (logits_first[:, 4:] - logits_second[:, 4:]).abs().max() > 1e-2


@torch.no_grad()
def test_bidirectional_text_would_leak_the_future(model):
    """The check above can fail: without caption mode, earlier positions read later tokens."""
    batch = tiny_batch(model)
    first, second = two_texts(model)
    _, logits_first = run_text(model, batch, first, caption_mode=False)
    _, logits_second = run_text(model, batch, second, caption_mode=False)
    assert (logits_first[:, :4] - logits_second[:, :4]).abs().max() > 1e-3


@torch.no_grad()
def test_text_leaves_image_side_unchanged_in_caption_mode(model):
    batch = tiny_batch(model)
    first, second = two_texts(model)
    features_first, _ = run_text(model, batch, first)
    features_second, _ = run_text(model, batch, second[:, :5])
    for a, b in zip(features_first, features_second, strict=True):
        assert torch.equal(a, b)
    detection_first, _ = run_text(model, batch, first, caption_mode=False)
    detection_second, _ = run_text(model, batch, second, caption_mode=False)
    assert max((a - b).abs().max() for a, b in zip(detection_first, detection_second)) > 1e-4


def test_next_token_labels_shift_each_caption_and_ignore_its_end():
    labels = next_token_labels([torch.tensor([101, 7, 8, 102]), torch.tensor([101, 9, 102])], 5)
    assert labels.tolist() == [[7, 8, 102, IGNORE_INDEX, IGNORE_INDEX], [9, 102, IGNORE_INDEX] + [IGNORE_INDEX] * 2]


def test_training_adds_the_next_token_cross_entropy():
    torch.manual_seed(0)
    model = build_model(caption_cfg()).train()
    batch = tiny_batch(model)
    captured = {}
    head = model.task_heads["CaptionHead"]
    head.register_forward_pre_hook(lambda module, args: captured.update(inputs=args[0]))
    losses = model(batch)
    assert {"loss_dot_product_token", "loss_reg", "loss_centerness", "loss_caption"} == set(losses)
    inputs = captured["inputs"]
    assert inputs.caption_mode
    ids = batch[0]["prompt"].input_ids
    scores = head.lm.logits(inputs.text[:, : len(ids) - 1]).float()
    expected = F.cross_entropy(scores.reshape(-1, scores.shape[-1]), torch.stack([ids[1:], ids[1:]]).reshape(-1))
    torch.testing.assert_close(losses["loss_caption"], expected)
    losses["loss_caption"].backward()
    assert head.lm.decoder.weight.grad.abs().sum() > 0
    assert model.language_backbone.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_captions_without_boxes_train_the_language_model_only():
    torch.manual_seed(0)
    model = build_model(caption_cfg()).train()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in tiny_batch(model)]
    losses = model(batch)
    assert float(losses["loss_dot_product_token"]) == 0.0 and float(losses["loss_reg"]) == 0.0
    assert float(losses["loss_caption"]) > 1.0


def test_detection_mode_of_a_caption_model_adds_no_caption_loss():
    torch.manual_seed(0)
    cfg = caption_cfg()
    cfg.MODEL.CAPTION_ON = False
    model = build_model(cfg).train()
    losses = model(tiny_batch(model))
    assert float(losses["loss_caption"]) == 0.0 and float(losses["loss_dot_product_token"]) > 0
    losses["loss_caption"].backward()
    assert model.task_heads["CaptionHead"].lm.decoder.weight.grad is not None


def test_caption_mode_needs_the_caption_head():
    cfg = tiny_cfg()
    cfg.MODEL.CAPTION_ON = True
    with pytest.raises(ValueError, match="CaptionHead"):
        build_model(cfg)


def test_the_output_layer_is_untied_and_never_emits_special_tokens(model):
    head: CaptionHead = model.task_heads["CaptionHead"]
    embeddings = model.language_backbone.model.embeddings.word_embeddings.weight
    assert head.lm.decoder.weight.data_ptr() != embeddings.data_ptr()
    logits = head.logits(torch.randn(3, model.language_backbone.hidden_size))
    tokenizer = model.tokenizer
    for token in (tokenizer.cls_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id, tokenizer.unk_token_id):
        assert torch.isinf(logits[:, token]).all()
    assert torch.isfinite(logits[:, tokenizer.sep_token_id]).all()
