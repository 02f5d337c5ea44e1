"""Optimizer recipe of GLIP training: per-part learning rates, no decay on norms/biases, full-model clipping."""

import pytest
import torch
from detectron2.modeling import build_model

from glipv2_d2.engine.optimization import build_glipv2_optimizer, freeze_parameters, with_full_model_clipping

from .tiny_model import tiny_cfg


def _group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


def test_learning_rates_and_weight_decay_per_parameter():
    cfg = tiny_cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.LANG_LR, cfg.SOLVER.BACKBONE_BODY_LR_FACTOR = 1e-4, 1e-5, 3.0
    cfg.SOLVER.FUSION_TEXT_LR_FACTOR = 0.5
    cfg.SOLVER.WEIGHT_DECAY = 0.05
    model = build_model(cfg)
    optimizer = build_glipv2_optimizer(cfg, model)
    params = dict(model.named_parameters())
    text = _group_of(optimizer, params["language_backbone.model.encoder.layer.0.attention.self.query.weight"])
    body = _group_of(optimizer, params["backbone.bottom_up.layers.0.blocks.0.attn.qkv.weight"])
    head = _group_of(optimizer, params["head.dot_product_projection_text.weight"])
    fusion_text = _group_of(optimizer, params["fusion.layers.1.text_layer.attention.self.query.weight"])
    assert fusion_text["lr"] == pytest.approx(5e-5)
    norm = _group_of(optimizer, params["fusion.layers.0.b_attn.layer_norm_v.weight"])
    bias = _group_of(optimizer, params["head.bbox_pred.bias"])
    assert (text["lr"], body["lr"], head["lr"]) == pytest.approx((1e-5, 3e-4, 1e-4))
    assert head["weight_decay"] == 0.05 and norm["weight_decay"] == 0.0 and bias["weight_decay"] == 0.0
    assert "WithFullModelGradientClipping" in type(optimizer).__name__


def test_full_model_clipping_bounds_the_global_norm():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    optimizer = with_full_model_clipping(torch.optim.SGD, max_norm=1.0)([a, b], lr=1.0)
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    global_norm = (27 + 64) ** 0.5
    optimizer.step()
    torch.testing.assert_close(a.data, torch.full((3,), -3.0 / global_norm))
    torch.testing.assert_close(b.data, torch.full((4,), -4.0 / global_norm))


def test_freeze_prefixes_for_prompt_tuning():
    cfg = tiny_cfg()
    cfg.SOLVER.FREEZE_PREFIXES = ["backbone.", "language_backbone.", "fusion."]
    model = build_model(cfg)
    frozen = freeze_parameters(cfg, model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert frozen and trainable and all(n.startswith("head.") for n in trainable)
