"""A task head or a fusion module registered here (not in the library) joins the model through the
config alone."""

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from glipv2_d2.modeling.fusion import FUSION_REGISTRY
from glipv2_d2.modeling.task_heads import TASK_HEAD_REGISTRY, GroundedTaskHead, TaskHeadInputs

from .test_training_step import tiny_batch
from .tiny_model import tiny_cfg

HEAD_NAME = "ToyBoxCountHead"


@TASK_HEAD_REGISTRY.register()
class ToyBoxCountHead(GroundedTaskHead):
    """Regresses each image's number of GT boxes from its pooled fused finest level and tags every
    detection with that count."""

    def __init__(self, cfg, input_shape, text_dim):
        super().__init__()
        self.strides = [shape.stride for shape in input_shape]
        self.text_dim = text_dim
        self.linear = nn.Linear(input_shape[0].channels, 1)
        self.seen: TaskHeadInputs | None = None

    def count(self, inputs: TaskHeadInputs) -> torch.Tensor:
        self.seen = inputs
        return self.linear(inputs.features[0].mean(dim=(2, 3))).squeeze(1)

    def losses(self, inputs):
        targets = torch.tensor([float(len(x["instances"])) for x in inputs.batched_inputs])
        return {"loss_toy_count": ((self.count(inputs) - targets) ** 2).mean()}

    def inference(self, inputs):
        counts = self.count(inputs)
        for detections, count in zip(inputs.detections, counts):
            detections.toy_count = count.expand(len(detections))
        return [{"toy_count": count} for count in counts]


@pytest.fixture()
def model():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.GLIPV2.TASK_HEADS = [HEAD_NAME]
    return build_model(cfg)


def test_config_adds_the_head_with_the_backbone_shapes(model):
    head = model.task_heads[HEAD_NAME]
    assert head.strides == [8, 16, 32, 64, 128]
    assert head.text_dim == model.language_backbone.hidden_size
    assert "task_heads.ToyBoxCountHead.linear.weight" in model.state_dict()


def test_training_adds_the_head_loss_and_trains_it(model):
    model.train()
    batch = tiny_batch(model)
    losses = model(batch)
    assert {"loss_dot_product_token", "loss_reg", "loss_centerness", "loss_toy_count"} == set(losses)
    head = model.task_heads[HEAD_NAME]
    seen = head.seen
    assert seen.detections is None and [p.caption for p in seen.prompts] == [x["prompt"].caption for x in batch]
    assert seen.text.shape[:2] == seen.text_mask.shape == (2, len(batch[0]["prompt"]))
    expected = ((head.linear(seen.features[0].mean(dim=(2, 3))).squeeze(1) - torch.tensor([2.0, 1.0])) ** 2).mean()
    torch.testing.assert_close(losses["loss_toy_count"], expected)
    losses["loss_toy_count"].backward()
    assert head.linear.weight.grad.abs().sum() > 0


def test_inference_returns_the_head_output_and_its_instance_field(model):
    model.eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} | {"height": 64, "width": 64} for x in tiny_batch(model)]
    with torch.no_grad():
        outputs = model(batch)
    head = model.task_heads[HEAD_NAME]
    expected = head.linear(head.seen.features[0].mean(dim=(2, 3))).squeeze(1)
    for output, count in zip(outputs, expected):
        torch.testing.assert_close(output["toy_count"], count)
        instances = output["instances"]
        assert len(instances) > 0 and instances.image_size == (64, 64)
        assert torch.equal(instances.toy_count, count.expand(len(instances)))


def test_unknown_or_repeated_heads_are_named():
    cfg = tiny_cfg()
    cfg.MODEL.GLIPV2.TASK_HEADS = ["NoSuchHead"]
    with pytest.raises(KeyError, match="NoSuchHead"):
        build_model(cfg)
    cfg.MODEL.GLIPV2.TASK_HEADS = [HEAD_NAME, HEAD_NAME]
    with pytest.raises(ValueError, match="more than once"):
        build_model(cfg)


@FUSION_REGISTRY.register()
class UnfusedLevels(nn.Module):
    """No fusion at all: image levels and text pass through unchanged."""

    def __init__(self, cfg, input_shape, lang_config):
        super().__init__()
        self.text_width = lang_config.hidden_size

    def output_shape(self, input_shape):
        return list(input_shape)

    def forward(self, features, lang_hidden, lang_mask):
        return list(features), lang_hidden


def test_config_swaps_the_fusion_module():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.MODEL.GLIPV2.FUSION = "UnfusedLevels"
    model = build_model(cfg).eval()
    assert isinstance(model.fusion, UnfusedLevels) and model.fusion.text_width == model.language_backbone.hidden_size
    batch = tiny_batch(model)[:1]
    with torch.no_grad():
        images = model.preprocess_image(batch)
        text = model.encode_text([batch[0]["prompt"]])
        outputs = model.run_network(images, text)
        pyramid = model.backbone(images.tensor)
        expected = model.head([pyramid[name] for name in model.level_names], text.hidden)
    torch.testing.assert_close(outputs.logits, expected["logits"])
    assert model.level_names == ["p3", "p4", "p5", "p6", "p7"]
