"""GLIPv2's language-guided mask head as a task head ("MaskHead", with MODEL.MASK_ON).

Each detected box (training: each proposal) is pooled from the FPN maps before fusion (or the
fused maps with MODEL.ROI_MASK_HEAD.USE_FUSED_FEATURES), sent through the hourglass, and its
28x28 pixel features are matched against the fused words of its own image's prompt. A box's mask
logit is the mean logit over its label's tokens (training: its matched GT phrase's tokens).

Unlike the official head: any number of images per batch, each with its own prompt; text of any
length (padding tokens are never read); zero boxes give empty outputs; a label absent from the
prompt's map gets probability 0.5, which pastes as an empty mask (officially the same, but
unwarned); GT masks may be polygons or bit masks.

Contract: inference adds ``pred_mask_probs`` ``(N, 1, 28, 28)`` to each image's detections, and
``finish_instances`` (called by the model once the boxes are at their output size) pastes them
into ``pred_masks``, a bool ``(N, H, W)`` at ``Instances.image_size``.
"""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.matcher import Matcher
from detectron2.structures import BitMasks, Instances, PolygonMasks
from torch import Tensor

from ..task_heads import TASK_HEAD_REGISTRY, GroundedTaskHead, TaskHeadInputs
from .hourglass import HourglassFeatureExtractor
from .loss import build_mask_targets
from .paste import paste_masks
from .pooler import LegacyLevelROIPooler
from .predictor import VisionLanguageMaskPredictor
from .proposals import TrainingProposals
from .tokens import label_token_weights, mean_token_logits

__all__ = ["MaskHead"]


@TASK_HEAD_REGISTRY.register()
class MaskHead(GroundedTaskHead):
    """Pooler + hourglass (``feature_extractor``) and region-word mask predictor (``predictor``),
    named as the official ``roi_heads.mask`` so its checkpoints load by prefix."""

    def __init__(self, cfg: CfgNode, input_shape: Sequence[ShapeSpec], text_dim: int):
        super().__init__()
        mask_cfg = cfg.MODEL.ROI_MASK_HEAD
        channels = list(mask_cfg.CONV_LAYERS)
        _check_config(cfg, channels, input_shape)
        pooler = LegacyLevelROIPooler(
            [shape.stride for shape in input_shape], mask_cfg.POOLER_RESOLUTION, mask_cfg.POOLER_SAMPLING_RATIO
        )
        self.feature_extractor = HourglassFeatureExtractor(pooler, channels, mask_cfg.HG_SCALE)
        self.predictor = VisionLanguageMaskPredictor(channels[-1], text_dim, cfg.MODEL.DYHEAD.LOG_SCALE_INIT)
        self.in_channels = channels[0]
        self.mask_size = 2 * mask_cfg.POOLER_RESOLUTION
        self.use_fused_features = mask_cfg.USE_FUSED_FEATURES
        self.paste_threshold = mask_cfg.PASTE_THRESHOLD
        iou = cfg.MODEL.ROI_HEADS
        self.matcher = Matcher(iou.IOU_THRESHOLDS, iou.IOU_LABELS, allow_low_quality_matches=False)
        self.training_proposals = TrainingProposals(cfg)

    def mask_logits(
        self, features: Sequence[Tensor], boxes: Sequence[Tensor], text: Tensor, token_weights: Tensor
    ) -> Tensor:
        """``(sum n_i, M, M)`` mean logits of per-image boxes over their ``(sum n_i, T)`` token
        weights; only tokens some box reads are scored."""
        if features[0].shape[1] != self.in_channels:
            raise ValueError(
                f"the mask head pools {features[0].shape[1]}-channel maps but MODEL.ROI_MASK_HEAD.CONV_LAYERS "
                f"starts with {self.in_channels} channels"
            )
        num_boxes = sum(len(b) for b in boxes)
        used = torch.nonzero(token_weights.sum(dim=0) > 0).squeeze(1)
        if num_boxes == 0 or len(used) == 0:
            return features[0].new_zeros((num_boxes, self.mask_size, self.mask_size))
        image_index = torch.cat([torch.full((len(b),), i, device=text.device) for i, b in enumerate(boxes)])
        box_features = self.feature_extractor(features, boxes)
        token_logits = self.predictor(box_features, text[:, used], image_index)
        return mean_token_logits(token_logits, token_weights[:, used])

    def predict_mask_probs(
        self,
        features: Sequence[Tensor],
        boxes: Sequence[Tensor],
        labels: Sequence[Tensor],
        text: Tensor,
        text_mask: Tensor,
        label_maps: Sequence[Mapping[int, Sequence[int]]],
    ) -> list[Tensor]:
        """Per image ``(n_i, 1, M, M)`` mask probabilities of boxes with prompt labels."""
        num_tokens = text.shape[1]
        weights = [label_token_weights(ids, m, num_tokens) for ids, m in zip(labels, label_maps, strict=True)]
        for image, (image_weights, image_mask) in enumerate(zip(weights, text_mask)):
            if ((image_weights > 0) & (image_mask[None, :] == 0)).any():
                raise ValueError(f"image {image}: a label's tokens fall on padding of its prompt")
        probs = self.mask_logits(features, boxes, text, torch.cat(weights)).sigmoid()[:, None]
        return list(probs.split([len(b) for b in boxes]))

    def mask_loss(
        self,
        features: Sequence[Tensor],
        proposals: Sequence[Tensor],
        text: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_masks: Sequence[PolygonMasks | BitMasks],
        positive_maps: Sequence[Tensor],
    ) -> Tensor:
        """BCE of the positives' phrase mean logits against their cropped GT masks; exactly 0
        (still attached to the head's parameters) when no proposal is positive."""
        targets = [
            build_mask_targets(p, b, m, pm, self.matcher, self.mask_size)
            for p, b, m, pm in zip(proposals, gt_boxes, gt_masks, positive_maps, strict=True)
        ]
        if sum(len(t.positive_inds) for t in targets) == 0:
            return sum(p.sum() for p in self.parameters()) * 0.0
        positives = [p[t.positive_inds] for p, t in zip(proposals, targets)]
        weights = torch.cat([t.token_weights for t in targets])
        logits = self.mask_logits(features, positives, text, weights)
        return F.binary_cross_entropy_with_logits(logits, torch.cat([t.targets for t in targets]))

    def losses(self, inputs: TaskHeadInputs) -> dict[str, Tensor]:
        device = inputs.text.device
        instances = [_ground_truth(x, i).to(device) for i, x in enumerate(inputs.batched_inputs)]
        num_tokens = inputs.text.shape[1]
        positive_maps = [
            _pad_tokens(x.positive_map.float(), num_tokens) * mask for x, mask in zip(instances, inputs.text_mask)
        ]
        gt_boxes = [x.gt_boxes.tensor for x in instances]
        proposals = self.training_proposals(inputs, gt_boxes, positive_maps)
        loss = self.mask_loss(
            self._levels(inputs), proposals, inputs.text, gt_boxes, [x.gt_masks for x in instances], positive_maps
        )
        return {"loss_mask": loss}

    def inference(self, inputs: TaskHeadInputs) -> list[dict]:
        detections = inputs.detections
        probs = self.predict_mask_probs(
            self._levels(inputs),
            [d.pred_boxes.tensor for d in detections],
            [d.pred_classes for d in detections],
            inputs.text,
            inputs.text_mask,
            [prompt.label_to_tokens for prompt in inputs.prompts],
        )
        for image_detections, image_probs in zip(detections, probs, strict=True):
            image_detections.pred_mask_probs = image_probs
        return [{} for _ in detections]

    def finish_instances(self, instances: Instances) -> Instances:
        """Paste ``pred_mask_probs`` into ``pred_masks`` at the instances' image size."""
        if instances.has("pred_mask_probs"):
            height, width = instances.image_size
            instances.pred_masks = paste_masks(
                instances.pred_mask_probs, instances.pred_boxes.tensor, height, width, self.paste_threshold
            )
        return instances

    def _levels(self, inputs: TaskHeadInputs) -> list[Tensor]:
        return inputs.features if self.use_fused_features else inputs.pre_fusion_features


def _check_config(cfg: CfgNode, channels: list[int], input_shape: Sequence[ShapeSpec]) -> None:
    mask_cfg = cfg.MODEL.ROI_MASK_HEAD
    if not cfg.MODEL.MASK_ON:
        raise ValueError("MODEL.GLIPV2.TASK_HEADS names MaskHead but MODEL.MASK_ON is False: set it True")
    if not channels or any(c != channels[0] for c in channels):
        raise ValueError(
            f"MODEL.ROI_MASK_HEAD.CONV_LAYERS must list one width per hourglass block, all equal (each block "
            f"keeps its input width), got {channels}"
        )
    if mask_cfg.HG_SCALE < 1 or mask_cfg.POOLER_RESOLUTION % (2**mask_cfg.HG_SCALE):
        raise ValueError(
            f"MODEL.ROI_MASK_HEAD.HG_SCALE {mask_cfg.HG_SCALE} needs POOLER_RESOLUTION divisible by "
            f"2^HG_SCALE (the hourglass halves it that often), got {mask_cfg.POOLER_RESOLUTION}"
        )
    if mask_cfg.USE_FUSED_FEATURES and input_shape[0].channels != channels[0]:
        raise ValueError(
            f"MODEL.ROI_MASK_HEAD.CONV_LAYERS starts with {channels[0]} channels but the fused maps have "
            f"{input_shape[0].channels}"
        )


def _ground_truth(x: dict, index: int) -> Instances:
    """The image's boxes with masks; an image whose boxes come without masks (detection-only data
    mixed in, or annotations only partly masked, which the mappers then train as boxes) gives
    none, so it adds nothing to the mask loss while its boxes still train the detector."""
    if "instances" not in x:
        raise ValueError(f"training input {index} ({x.get('file_name', 'no file name')}) has no 'instances'")
    instances = x["instances"]
    if instances.has("gt_masks"):
        return instances
    without_boxes = instances[:0]
    without_boxes.gt_masks = PolygonMasks([])
    return without_boxes


def _pad_tokens(positive_map: Tensor, num_tokens: int) -> Tensor:
    if positive_map.shape[1] > num_tokens:
        raise ValueError(f"positive_map has {positive_map.shape[1]} token columns, the batch only {num_tokens}")
    return F.pad(positive_map, (0, num_tokens - positive_map.shape[1]))
