"""SOLVER.TRAIN_ONLY_PREFIXES (the second-stage mask pre-training of GLIPv2, paper section 3.2):
after a few steps every parameter and buffer outside the trained prefix is bit-for-bit unchanged."""

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks
from torch import nn

from glipv2_d2.engine.optimization import build_glipv2_optimizer, describe_trainable, freeze_parameters
from glipv2_d2.modeling.task_heads import TASK_HEAD_REGISTRY, GroundedTaskHead

from .test_training_step import tiny_batch
from .tiny_model import tiny_cfg

HEAD_NAME = "ToyNormalisedCountHead"


@TASK_HEAD_REGISTRY.register()
class ToyNormalisedCountHead(GroundedTaskHead):
    """Regresses each image's number of GT boxes from its batch-normalised pooled finest fused level:
    a head with running statistics, to see that frozen ones stay put."""

    def __init__(self, cfg, input_shape, text_dim):
        super().__init__()
        self.norm = nn.BatchNorm1d(input_shape[0].channels)
        self.linear = nn.Linear(input_shape[0].channels, 1)

    def losses(self, inputs):
        counts = self.linear(self.norm(inputs.features[0].mean(dim=(2, 3)))).squeeze(1)
        targets = torch.tensor([float(len(x["instances"])) for x in inputs.batched_inputs])
        return {"loss_toy_count": ((counts - targets) ** 2).mean()}

    def inference(self, inputs):
        return [{} for _ in inputs.detections]


def _cfg(train_only: list[str]):
    cfg = tiny_cfg()
    cfg.MODEL.GLIPV2.TASK_HEADS = [HEAD_NAME]
    cfg.SOLVER.TRAIN_ONLY_PREFIXES = train_only
    cfg.SOLVER.BASE_LR = 1e-2
    return cfg


def _train(cfg, model: nn.Module, steps: int) -> None:
    optimizer = build_glipv2_optimizer(cfg, model)
    model.train()
    batch = tiny_batch(model)
    for _ in range(steps):
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_only_the_listed_prefix_trains_and_frozen_norms_keep_their_statistics():
    torch.manual_seed(0)
    trained_prefix = f"task_heads.{HEAD_NAME}.linear."
    cfg = _cfg([trained_prefix])
    model = build_model(cfg)
    frozen = freeze_parameters(cfg, model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        trained_prefix + "weight", trained_prefix + "bias"
    }
    assert f"task_heads.{HEAD_NAME}.norm.weight" in frozen and "head.bbox_pred.weight" in frozen
    assert describe_trainable(model).startswith("training 65 of ")
    before = _snapshot(model)
    _train(cfg, model, steps=3)
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {trained_prefix + "weight", trained_prefix + "bias"}
    norm = model.task_heads[HEAD_NAME].norm
    assert not norm.training and model.training


def test_without_the_key_the_same_norm_updates_its_statistics():
    torch.manual_seed(0)
    cfg = _cfg([f"task_heads.{HEAD_NAME}."])
    model = build_model(cfg)
    freeze_parameters(cfg, model)
    before = _snapshot(model)
    _train(cfg, model, steps=1)
    prefix = f"task_heads.{HEAD_NAME}.norm."
    assert not torch.equal(before[prefix + "running_mean"], model.state_dict()[prefix + "running_mean"])
    assert int(model.state_dict()[prefix + "num_batches_tracked"]) == 1


def test_a_prefix_matching_nothing_is_named():
    cfg = _cfg(["task_heads.MaskHed."])
    with pytest.raises(ValueError, match=r"TRAIN_ONLY_PREFIXES entry 'task_heads.MaskHed.' matches no parameter"):
        freeze_parameters(cfg, build_model(cfg))


@pytest.mark.parametrize(
    ("train_only", "key", "value"),
    [
        ("task_heads.", "SOLVER.FREEZE_PREFIXES", [f"task_heads.{HEAD_NAME}.norm."]),
        ("language_backbone.model.encoder.", "MODEL.LANGUAGE_BACKBONE.FREEZE", True),
    ],
)
def test_a_prefix_also_frozen_is_a_conflict_naming_both_keys(train_only, key, value):
    cfg = _cfg([train_only])
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=rf"entry '{train_only}' trains '.+', which {key}"):
        freeze_parameters(cfg, build_model(cfg))


def _with_rectangle_masks(batch: list[dict]) -> list[dict]:
    """tiny_batch's scenes are filled rectangles, so each box is its own exact mask."""
    for x in batch:
        instances = x["instances"]
        masks = torch.zeros(len(instances), *x["image"].shape[1:], dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, instances.gt_boxes.tensor.int().tolist()):
            mask[y0:y1, x0:x1] = True
        instances.gt_masks = BitMasks(masks)
    return batch


def test_the_mask_stage_trains_the_mask_head_alone():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.GLIPV2.TASK_HEADS = ["MaskHead"]
    cfg.MODEL.ROI_MASK_HEAD.CONV_LAYERS = [64]
    cfg.SOLVER.TRAIN_ONLY_PREFIXES = ["task_heads.MaskHead."]
    model = build_model(cfg)
    freeze_parameters(cfg, model)
    head = {f"task_heads.MaskHead.{name}" for name, _ in model.task_heads["MaskHead"].named_parameters()}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head
    before = _snapshot(model)
    optimizer = build_glipv2_optimizer(cfg, model)
    model.train()
    batch = _with_rectangle_masks(tiny_batch(model))
    for _ in range(2):
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert losses["loss_mask"] > 0
    changed = {name for name, value in model.state_dict().items() if not torch.equal(before[name], value)}
    assert changed == head
