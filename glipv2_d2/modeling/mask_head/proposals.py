"""The boxes the mask head learns on: GLIP's train-mode ATSS proposals plus the GT boxes.

As officially, the ATSS post-processor runs on the training outputs with the training thresholds
(MODEL.ATSS.*_TRAIN), each GT phrase acting as a label, and the GT boxes are appended. The boxes
carry no gradient (ROIAlign has none for boxes, and matching is discrete).
"""

from collections.abc import Sequence

import torch
from detectron2.config import CfgNode
from torch import Tensor

from ..box_coder import LegacyBoxCoder
from ..postprocessing import ATSSPostProcessor
from ..task_heads import TaskHeadInputs

__all__ = ["TrainingProposals"]


class TrainingProposals:
    """Per-image ``(n_i, 4)`` proposal boxes in network-input pixels, GT boxes last."""

    def __init__(self, cfg: CfgNode):
        atss = cfg.MODEL.ATSS
        self.post_processor = ATSSPostProcessor(
            box_coder=LegacyBoxCoder(cfg),
            score_thresh=atss.INFERENCE_TH_TRAIN,
            pre_nms_top_n=atss.PRE_NMS_TOP_N_TRAIN,
            nms_thresh=atss.NMS_TH,
            detections_per_img=atss.POST_NMS_TOP_N_TRAIN,
        )

    def __call__(
        self, inputs: TaskHeadInputs, gt_boxes: Sequence[Tensor], positive_maps: Sequence[Tensor]
    ) -> list[Tensor]:
        """``positive_maps``: per image ``(G, T)``; GT row ``g`` is label ``g + 1`` (rows without a
        token name no label)."""
        label_maps = [
            {row + 1: torch.nonzero(tokens).squeeze(1).tolist() for row, tokens in enumerate(positive_map > 0)
             if tokens.any()}
            for positive_map in positive_maps
        ]
        if not any(label_maps):
            return [boxes.detach() for boxes in gt_boxes]
        with torch.no_grad():
            detections = self.post_processor(
                inputs.bbox_reg, inputs.centerness, inputs.logits, inputs.anchors, inputs.images.image_sizes,
                label_maps,
            )
        return [torch.cat((d.pred_boxes.tensor, boxes.detach())) for d, boxes in zip(detections, gt_boxes, strict=True)]
