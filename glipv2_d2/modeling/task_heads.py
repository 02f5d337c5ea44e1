"""Task heads: extra outputs of the one grounded model (masks, answers, captions, a user's own),
added by config (MODEL.GLIPV2.TASK_HEADS) without touching the meta-architecture.

A head sees what the model computed for the batch (``TaskHeadInputs``): the image levels before and
after fusion, the fused text, the prompts, the anchors and raw region-word predictions, the input
dicts (for its ground truth), and at inference the detections. In training it returns a dict of
losses; at inference a dict of extra outputs per image, and it may add fields to the detections
(they are still in the network input's pixels; the model rescales boxes afterwards, then lets each
head finish the fields that depend on the output size: ``finish_instances``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.structures import ImageList, Instances
from detectron2.utils.registry import Registry
from torch import Tensor, nn

from ..structures import Prompt

__all__ = ["TASK_HEAD_REGISTRY", "GroundedTaskHead", "TaskHeadInputs", "build_task_heads"]

TASK_HEAD_REGISTRY = Registry("GLIPV2_TASK_HEAD")
TASK_HEAD_REGISTRY.__doc__ = """Task heads of GLIPv2. A registered class is called as
``cls(cfg, input_shape, text_dim)`` with the fused image levels' shapes (finest first) and the
fused text width, and must be a ``GroundedTaskHead``."""


@dataclass
class TaskHeadInputs:
    """What a task head may read about one batch.

    Attributes:
        images: the normalised, padded batch.
        batched_inputs: the model's input dicts (ground truth of the head's task lives there).
        prompts: each image's prompt.
        pre_fusion_features: backbone levels before fusion, ``(B, C, H, W)`` each, finest first.
        features: fused image levels, same layout.
        text: fused text ``(B, T, D)``; ``text_mask`` ``(B, T)`` marks real tokens.
        text_mask: see ``text``.
        anchors: per level ``(H*W*A, 4)``, shared by all images.
        logits: region-word logits per level ``(B, H*W, T)``; ``bbox_reg`` / ``centerness`` per level.
        bbox_reg: see ``logits``.
        centerness: see ``logits``.
        detections: at inference, each image's detections in network-input pixels; None in training.
        caption_mode: whether the text was read causally and the image blind to it (captioning).
    """

    images: ImageList
    batched_inputs: list[dict]
    prompts: list[Prompt]
    pre_fusion_features: list[Tensor]
    features: list[Tensor]
    text: Tensor
    text_mask: Tensor
    anchors: list[Tensor]
    logits: list[Tensor]
    bbox_reg: list[Tensor]
    centerness: list[Tensor]
    detections: list[Instances] | None = None
    caption_mode: bool = False


class GroundedTaskHead(nn.Module):
    """Base of task heads: ``forward`` calls ``losses`` in training and ``inference`` otherwise."""

    def losses(self, inputs: TaskHeadInputs) -> dict[str, Tensor]:
        """Loss terms, named ``loss_*``; they are added to the model's losses."""
        raise NotImplementedError

    def inference(self, inputs: TaskHeadInputs) -> list[dict]:
        """Extra outputs per image, merged into the model's output dicts; may add fields to
        ``inputs.detections``."""
        raise NotImplementedError

    def finish_instances(self, instances: Instances) -> Instances:
        """One image's final detections, once their boxes are at the output size (or the network
        input's without rescaling): turn fields that depend on that size into it (masks pasted
        into the image). Unchanged by default."""
        return instances

    def forward(self, inputs: TaskHeadInputs) -> dict[str, Tensor] | list[dict]:
        return self.losses(inputs) if self.training else self.inference(inputs)


def build_task_heads(cfg: CfgNode, input_shape: Sequence[ShapeSpec], text_dim: int) -> nn.ModuleDict:
    """The heads named in cfg.MODEL.GLIPV2.TASK_HEADS, keyed by name (their checkpoint prefix)."""
    names = list(cfg.MODEL.GLIPV2.TASK_HEADS)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"MODEL.GLIPV2.TASK_HEADS names {repeated} more than once")
    if cfg.MODEL.MASK_ON and "MaskHead" not in names:
        raise ValueError("MODEL.MASK_ON is True but MODEL.GLIPV2.TASK_HEADS does not name MaskHead: add it")
    heads = nn.ModuleDict()
    for name in names:
        head = TASK_HEAD_REGISTRY.get(name)(cfg, input_shape, text_dim)
        if not isinstance(head, GroundedTaskHead):
            raise TypeError(f"task head {name!r} is a {type(head).__name__}, not a GroundedTaskHead")
        heads[name] = head
    return heads
