"""EncV: Detectron2's Swin Transformer + FPN with RetinaNet-style P6/P7, as in GLIP.

Detectron2's own `SwinTransformer` is used unchanged: it pads each block's input to a multiple of
the window BEFORE the cyclic shift, exactly like the official detection Swin (timm shifts first
and differs on sizes that are not multiples of the window).
"""

import math

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelP6P7
from detectron2.modeling.backbone.swin import SwinTransformer, SwinTransformerBlock
from torch import Tensor
from torch.utils.checkpoint import checkpoint


class ExactSizeFPN(FPN):
    """Detectron2's FPN whose top-down path upsamples to the lateral map's exact size.

    Detectron2 upsamples by a fixed factor of 2, which only lines up when the image is padded to
    the coarsest stride. maskrcnn_benchmark (and so GLIP) interpolates to the lateral's size, which
    is identical on padded inputs and also well defined on any other size; we follow it so that the
    backbone reproduces the official features for every input. Only `forward` differs.
    """

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        bottom_up_features = self.bottom_up(x)
        prev_features = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        results = [self.output_convs[0](prev_features)]
        for idx in range(1, len(self.lateral_convs)):
            lateral = self.lateral_convs[idx](bottom_up_features[self.in_features[-idx - 1]])
            top_down = F.interpolate(prev_features, size=lateral.shape[-2:], mode="nearest")
            prev_features = lateral + top_down
            if self._fuse_type == "avg":
                prev_features = prev_features / 2
            results.insert(0, self.output_convs[idx](prev_features))
        if self.top_block is not None:
            top_input = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_input))
        return dict(zip(self._out_features, results))


class CheckpointedSwinBlock(SwinTransformerBlock):
    """Detectron2's Swin block under non-reentrant gradient checkpointing (MODEL.SWIN.USE_CHECKPOINT).

    Detectron2's own switch checkpoints the reentrant way, which gives a block no gradients when its
    input does not require grad: with MODEL.SWIN.FROZEN_STAGES 0 (patch embedding frozen) the whole
    first stage silently stopped learning. The block's size, which its stage sets on it before each
    call, is taken at the call, so the recomputation in backward uses the same one.
    """

    def forward(self, x: Tensor, mask_matrix: Tensor) -> Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x, mask_matrix)
        height, width = self.H, self.W

        def block(x: Tensor, mask_matrix: Tensor) -> Tensor:
            self.H, self.W = height, width
            return SwinTransformerBlock.forward(self, x, mask_matrix)

        return checkpoint(block, x, mask_matrix, use_reentrant=False)


def build_swin(cfg: CfgNode, input_shape: ShapeSpec) -> SwinTransformer:
    """Detectron2's Swin configured from cfg.MODEL.SWIN; with USE_CHECKPOINT its blocks become
    ``CheckpointedSwinBlock`` (same parameters and names, only the forward differs)."""
    swin = cfg.MODEL.SWIN
    out_indices = tuple(int(name[1:]) for name in swin.OUT_FEATURES)
    model = SwinTransformer(
        patch_size=swin.PATCH_SIZE,
        in_chans=input_shape.channels,
        embed_dim=swin.EMBED_DIM,
        depths=tuple(swin.DEPTHS),
        num_heads=tuple(swin.NUM_HEADS),
        window_size=swin.WINDOW_SIZE,
        mlp_ratio=swin.MLP_RATIO,
        drop_path_rate=swin.DROP_PATH_RATE,
        ape=swin.APE,
        out_indices=out_indices,
        frozen_stages=swin.FROZEN_STAGES,
    )
    if swin.USE_CHECKPOINT:
        for stage in model.layers:
            for block in stage.blocks:
                block.__class__ = CheckpointedSwinBlock
    return model


@BACKBONE_REGISTRY.register()
def build_swin_fpn_p6p7_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """Swin stages -> FPN (P3-P5) -> P6/P7 computed from P5's FPN output (GLIP's RETINANET body)."""
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    bottom_up = build_swin(cfg, input_shape)
    last_stride = bottom_up.output_shape()[cfg.MODEL.FPN.IN_FEATURES[-1]].stride
    return ExactSizeFPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature=f"p{int(math.log2(last_stride))}"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
