"""The VQA head on the tiny model: pooling over real tokens only, the [CLS] option, the BCE
normalisation, training through the whole model (with grounded VQA's boxes), inference outputs."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from glipv2_d2.data.prompt_builder import PromptBuilder
from glipv2_d2.data.vqa_answers import AnswerVocabulary
from glipv2_d2.data.vqa_prompts import build_question_prompt
from glipv2_d2.modeling.vqa_head import VQAHead, pool_text

from .tiny_model import tiny_cfg

ANSWERS = ["2", "3", "yes", "no", "red"]


@pytest.fixture()
def cfg(tmp_path):
    cfg = tiny_cfg()
    cfg.MODEL.GLIPV2.TASK_HEADS = ["VQAHead"]
    cfg.MODEL.VQA.NUM_ANSWERS = len(ANSWERS)
    AnswerVocabulary(ANSWERS).save(tmp_path / "answers.json")
    cfg.MODEL.VQA.ANSWER_VOCAB_FILE = str(tmp_path / "answers.json")
    cfg.MODEL.VQA.HIDDEN_DIM = 16
    return cfg


def test_attention_pooling_reads_real_tokens_only():
    torch.manual_seed(0)
    text = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    scores = torch.randn(2, 5)
    pooled = pool_text(text, mask, scores)
    changed = text.clone()
    changed[0, 3:] = 100.0
    assert torch.equal(pool_text(changed, mask, scores), pooled)
    weights = torch.softmax(scores[0, :3], dim=0)
    assert torch.allclose(pooled[0], (weights[:, None] * text[0, :3]).sum(0))
    assert torch.equal(pool_text(text, mask, None), text[:, 0])


def test_head_shapes_and_first_token_option(cfg):
    head = VQAHead(cfg, [], text_dim=8)
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [16, 16]
    assert head.classifier.out_features == len(ANSWERS) and head.attention is not None
    cfg.MODEL.VQA.POOLING = "first_token"
    head = VQAHead(cfg, [], text_dim=8)
    assert head.attention is None
    text = torch.randn(1, 3, 8)
    other = text.clone()
    other[0, 1:] = 5.0
    mask = torch.ones(1, 3)
    assert torch.equal(head.answer_logits(text, mask), head.answer_logits(other, mask))
    cfg.MODEL.VQA.POOLING = "mean"
    with pytest.raises(ValueError, match="MODEL.VQA.POOLING"):
        VQAHead(cfg, [], text_dim=8)


class _Inputs:
    def __init__(self, text, mask, batched_inputs):
        self.text, self.text_mask, self.batched_inputs = text, mask, batched_inputs


def test_loss_is_bce_summed_over_answers_and_averaged_over_questions(cfg):
    torch.manual_seed(0)
    head = VQAHead(cfg, [], text_dim=8)
    text, mask = torch.randn(3, 4, 8), torch.ones(3, 4)
    targets = torch.tensor([[1.0, 0, 0, 0, 0], [0, 2 / 3, 0, 1 / 3, 0]])
    batch = [{"vqa_targets": targets[0]}, {}, {"vqa_targets": targets[1]}]  # the middle input is not VQA
    loss = head.losses(_Inputs(text, mask, batch))["loss_vqa"]
    logits = head.answer_logits(text[[0, 2]], mask[[0, 2]])
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    no_vqa = head.losses(_Inputs(text, mask, [{}, {}, {}]))["loss_vqa"]
    assert no_vqa.item() == 0.0 and no_vqa.requires_grad
    with pytest.raises(ValueError, match=r"'vqa_targets' has shape \(3,\)"):
        head.losses(_Inputs(text, mask, [{"vqa_targets": torch.zeros(3)}, {}, {}]))


def _image():
    return torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_grounded_training_step_adds_vqa_to_the_grounding_losses_and_trains_the_head(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).train()
    question = build_question_prompt(PromptBuilder(cfg, model.tokenizer), "what colour is the circle?",
                                     [[[19, 25]]], grounded=True)
    prompt = question.prompt
    instances = Instances((96, 128), gt_boxes=Boxes(torch.tensor([[20.0, 20.0, 70.0, 80.0]])))
    positive = torch.zeros(1, len(prompt), dtype=torch.bool)
    positive[0, prompt.label_to_tokens[0] + prompt.label_to_tokens[question.answer_label]] = True
    instances.positive_map = positive
    targets = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    losses = model([{"image": _image(), "prompt": prompt, "instances": instances, "vqa_targets": targets}])
    assert set(losses) >= {"loss_vqa", "loss_dot_product_token", "loss_reg", "loss_centerness"}
    assert all(losses[k].item() > 0 for k in ("loss_vqa", "loss_dot_product_token", "loss_reg"))
    sum(losses.values()).backward()
    head = model.task_heads["VQAHead"]
    assert head.classifier.weight.grad.abs().sum() > 0 and head.attention.weight.grad.abs().sum() > 0
    assert model.fusion.parameters().__next__().grad is not None  # the answer loss reaches the fusion


def test_inference_returns_the_top_answers_with_scores_and_the_answer_boxes(cfg):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    question = build_question_prompt(PromptBuilder(cfg, model.tokenizer), "is there a red circle?",
                                     [[[11, 21]]], grounded=True)
    with torch.no_grad():
        (output,) = model.inference([{"image": _image(), "prompt": question.prompt}])
    vqa = output["vqa"]
    assert vqa["answer"] in ANSWERS and vqa["answer"] == vqa["topk"][0]["answer"] == ANSWERS[vqa["answer_id"]]
    scores = [entry["score"] for entry in vqa["topk"]]
    assert len(scores) == cfg.MODEL.VQA.TOP_K == 5 and scores == sorted(scores, reverse=True)
    assert 0 < scores[-1] <= scores[0] < 1
    labels = set(output["instances"].pred_classes.tolist())
    assert labels <= {0, question.answer_label} and question.answer_label in labels


def test_inference_names_a_missing_or_mismatched_vocabulary(cfg, tmp_path):
    cfg.MODEL.VQA.ANSWER_VOCAB_FILE = str(tmp_path / "nowhere.json")
    model = build_model(cfg).eval()
    prompt = build_question_prompt(PromptBuilder(cfg, model.tokenizer), "how many?", grounded=False).prompt
    with pytest.raises(FileNotFoundError, match="nowhere.json"), torch.no_grad():
        model.inference([{"image": _image(), "prompt": prompt}])
    AnswerVocabulary(["yes", "no"]).save(tmp_path / "two.json")
    cfg.MODEL.VQA.ANSWER_VOCAB_FILE = str(tmp_path / "two.json")
    model = build_model(cfg).eval()
    with pytest.raises(ValueError, match="has 2 answers but MODEL.VQA.NUM_ANSWERS is 5"), torch.no_grad():
        model.inference([{"image": _image(), "prompt": prompt}])
