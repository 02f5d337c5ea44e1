"""GLIP's grounding losses on ATSS anchors (official ``ATSSLossComputation``, dot-product token branch).

Three terms, normalised as in the official code so that released hyper-parameters transfer:

* ``loss_dot_product_token``: binary sigmoid focal loss between the anchor-to-token logits and the
  matched GT's positive-map row, summed over text-masked tokens, divided by the positives per GPU;
* ``loss_reg``: GIoU of the decoded boxes weighted by the centerness targets, divided by their
  per-GPU sum;
* ``loss_centerness``: summed BCE-with-logits against the centerness targets, divided by the
  positives per GPU.

The official legacy 80-class ``loss_cls`` is always multiplied by 0 for GLIP, so it is not built.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.utils import comm
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .atss_assigner import atss_assign
from .box_coder import LegacyBoxCoder

__all__ = [
    "GroundingATSSLoss",
    "GroundingTargets",
    "centerness_targets",
    "giou_loss",
    "token_sigmoid_focal_loss",
]

# Floor of the regression normaliser (only reached when no rank has a positive).
_TINY = torch.finfo(torch.float32).tiny


def token_sigmoid_focal_loss(
    logits: Tensor,
    targets: Tensor,
    text_mask: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    image_weights: Tensor | None = None,
) -> Tensor:
    """Summed binary focal loss over (image, anchor, token) entries whose token is in ``text_mask``.

    Same per-element formula as the official ``token_sigmoid_binary_focal_loss`` (the fvcore /
    torchvision one). Masking by multiplication instead of ``masked_select`` keeps shapes static.

    Args:
        logits: ``(B, A, T)`` anchor-to-token logits.
        targets: ``(B, A, T)`` binary targets (bool or float).
        text_mask: ``(B, T)``; tokens with a value > 0 take part.
        image_weights: optional ``(B,)`` factor of each image's terms (weak pseudo-box data).
    """
    logits = logits.float()
    losses = sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="none")
    weights = (text_mask > 0).to(losses.dtype)
    if image_weights is not None:
        weights = weights * image_weights[:, None].to(losses.dtype)
    return (losses * weights[:, None, :]).sum()


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor, weights: Tensor | None = None) -> Tensor:
    """Summed ``1 - GIoU`` of ``(P, 4)`` boxes as the official ``GIoULoss``.

    Areas have no "+1"; the predicted ``x2, y2`` are first raised to at least ``x1, y1`` (the
    official code does this, torchvision does not), after which torchvision's loss is the same
    formula with the same 1e-7 in the IoU and enclosing-area denominators. With ``weights`` the
    sum is weighted, unless they sum to 0, where the official code falls back to the plain sum.
    """
    pred_boxes, target_boxes = pred_boxes.float(), target_boxes.float()
    x1, y1, x2, y2 = pred_boxes.unbind(dim=-1)
    pred_boxes = torch.stack((x1, y1, torch.max(x1, x2), torch.max(y1, y2)), dim=-1)
    losses = generalized_box_iou_loss(pred_boxes, target_boxes, reduction="none")
    if weights is None:
        return losses.sum()
    return torch.where(weights.sum() > 0, (losses * weights).sum(), losses.sum())


def centerness_targets(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """FCOS centerness ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))`` of each anchor centre
    w.r.t. its GT box ``(P, 4)``.

    Pass the GT as the official code sees it, i.e. after an encode -> decode round trip
    through the box coder; the round trip shifts the numbers slightly.
    """
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    cy = (anchors[:, 1] + anchors[:, 3]) / 2
    left_right = torch.stack((cx - gt_boxes[:, 0], gt_boxes[:, 2] - cx), dim=1)
    top_bottom = torch.stack((cy - gt_boxes[:, 1], gt_boxes[:, 3] - cy), dim=1)
    ratio_x = left_right.min(dim=1).values / left_right.max(dim=1).values
    ratio_y = top_bottom.min(dim=1).values / top_bottom.max(dim=1).values
    return torch.sqrt(ratio_x * ratio_y)


def _all_reduce_sum(value: Tensor) -> Tensor:
    """Sum over all processes (every rank must call this, positives or not, to stay in step)."""
    if comm.get_world_size() > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
    return value


@dataclass
class GroundingTargets:
    """ATSS training targets of a batch; anchors are indexed image-major, then level, then ``y*W+x``.

    Attributes:
        matched_idxs: ``(B, A)`` int64, the matched GT index within its image, -1 for negatives.
        token_labels: ``(B, A, T)`` float, the matched GT's positive-map row; negatives carry the
            official "no object" 1 at token ``max_query_len - 1`` when that column exists.
        positive_indices: ``(P,)`` int64 indices into the ``B * A`` flattened anchors, ascending.
        reg_targets: ``(P, 4)`` encoded matched GT boxes of the positives.
        centerness_targets: ``(P,)`` centerness of the positives.
    """

    matched_idxs: Tensor
    token_labels: Tensor
    positive_indices: Tensor
    reg_targets: Tensor
    centerness_targets: Tensor


class GroundingATSSLoss:
    """The official GLIP training losses (dict with ``loss_dot_product_token``, ``loss_reg`` and
    ``loss_centerness``), computed in float32 even under autocast.

    A plain class (no parameters), so that it adds nothing to the model's state dict.
    """

    @configurable
    def __init__(
        self,
        box_coder: LegacyBoxCoder,
        topk: int = 9,
        reg_loss_weight: float = 2.0,
        token_loss_weight: float = 1.0,
        centerness_loss_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        max_query_len: int = 256,
    ) -> None:
        self.box_coder = box_coder
        self.topk = int(topk)
        self.reg_loss_weight = float(reg_loss_weight)
        self.token_loss_weight = float(token_loss_weight)
        self.centerness_loss_weight = float(centerness_loss_weight)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.max_query_len = int(max_query_len)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        atss = cfg.MODEL.ATSS
        return {
            "box_coder": LegacyBoxCoder(cfg),
            "topk": atss.TOPK,
            "reg_loss_weight": atss.REG_LOSS_WEIGHT,
            "token_loss_weight": atss.TOKEN_LOSS_WEIGHT,
            "centerness_loss_weight": atss.CENTERNESS_LOSS_WEIGHT,
            "focal_alpha": atss.FOCAL_ALPHA,
            "focal_gamma": atss.FOCAL_GAMMA,
            "max_query_len": cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN,
        }

    def __call__(
        self,
        anchors: list[Tensor],
        gt_boxes: list[Tensor],
        positive_maps: list[Tensor],
        logits: list[Tensor],
        bbox_reg: list[Tensor],
        centerness: list[Tensor],
        text_mask: Tensor,
        image_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Losses for one batch.

        Args:
            anchors: per level ``(A_l, 4)``, shared by all images.
            gt_boxes: per image ``(N_i, 4)`` boxes ``x1, y1, x2, y2``.
            positive_maps: per image ``(N_i, T)`` binary GT-to-token maps.
            logits: per level ``(B, A_l, T)`` anchor-to-token logits.
            bbox_reg: per level ``(B, 4, H, W)`` box deltas.
            centerness: per level ``(B, 1, H, W)`` centerness logits.
            text_mask: ``(B, T)`` attention mask of the prompt tokens.
            image_weights: optional ``(B,)`` factor of each image's terms (1 = official); the
                normalisers stay the official ones.
        """
        if not len(gt_boxes) == len(positive_maps) == logits[0].shape[0]:
            raise ValueError(
                f"batch of {logits[0].shape[0]} predictions but {len(gt_boxes)} gt_boxes and "
                f"{len(positive_maps)} positive_maps"
            )
        targets = self.prepare_targets(anchors, gt_boxes, positive_maps, logits[0].shape[-1])
        return self.losses(targets, anchors, logits, bbox_reg, centerness, text_mask, image_weights)

    @torch.no_grad()
    def prepare_targets(
        self, anchors: list[Tensor], gt_boxes: list[Tensor], positive_maps: list[Tensor], num_tokens: int
    ) -> GroundingTargets:
        """ATSS-assign every image and build the token, regression and centerness targets."""
        anchors_flat = torch.cat(anchors, dim=0).float()
        matched, token_labels = [], []
        for i, (boxes, positive_map) in enumerate(zip(gt_boxes, positive_maps, strict=True)):
            if positive_map.shape != (boxes.shape[0], num_tokens):
                raise ValueError(
                    f"positive_maps[{i}] has shape {tuple(positive_map.shape)}, expected "
                    f"({boxes.shape[0]}, {num_tokens}) = (gt boxes of image {i}, logit tokens)"
                )
            matched_gt, _ = atss_assign(anchors, boxes.float(), self.topk)
            matched.append(matched_gt)
            token_labels.append(self._token_labels(matched_gt, positive_map.float()))
        matched_idxs = torch.stack(matched, dim=0)

        positive_indices = torch.nonzero(matched_idxs.reshape(-1) >= 0).squeeze(1)
        image_idx = positive_indices // anchors_flat.shape[0]
        anchor_idx = positive_indices % anchors_flat.shape[0]
        boxes_padded = _pad_boxes(gt_boxes, anchors_flat)
        matched_boxes = boxes_padded[image_idx, matched_idxs[image_idx, anchor_idx]]
        pos_anchors = anchors_flat[anchor_idx]
        reg_targets = self.box_coder.encode(matched_boxes, pos_anchors)
        round_trip = self.box_coder.decode(reg_targets, pos_anchors)
        return GroundingTargets(
            matched_idxs=matched_idxs,
            token_labels=torch.stack(token_labels, dim=0),
            positive_indices=positive_indices,
            reg_targets=reg_targets,
            centerness_targets=centerness_targets(pos_anchors, round_trip),
        )

    def _token_labels(self, matched_gt: Tensor, positive_map: Tensor) -> Tensor:
        """``(A, T)`` token targets of one image.

        Negatives get the official "no object" 1 at token ``max_query_len - 1`` (255). With dynamic
        padding (``T < max_query_len``) that column does not exist; in the official layout it would
        be a padding token whose text mask is 0, so leaving it out gives the same loss.
        """
        num_tokens = positive_map.shape[1]
        padded = torch.cat((positive_map.new_zeros(1, num_tokens), positive_map), dim=0)
        labels = padded[matched_gt + 1]
        if num_tokens == self.max_query_len:
            labels[:, -1] = torch.where(matched_gt >= 0, labels[:, -1], torch.ones_like(labels[:, -1]))
        return labels

    def losses(
        self,
        targets: GroundingTargets,
        anchors: list[Tensor],
        logits: list[Tensor],
        bbox_reg: list[Tensor],
        centerness: list[Tensor],
        text_mask: Tensor,
        image_weights: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The loss dict for prepared targets (see ``__call__`` for the prediction layouts)."""
        with torch.autocast(device_type=logits[0].device.type, enabled=False):
            token_logits = torch.cat(logits, dim=1).float()
            deltas = torch.cat([r.permute(0, 2, 3, 1).reshape(r.shape[0], -1, 4) for r in bbox_reg], dim=1)
            ctr_logits = torch.cat([c.reshape(c.shape[0], -1) for c in centerness], dim=1)
            anchors_flat = torch.cat(anchors, dim=0).float()
            pos = targets.positive_indices
            pos_anchors = anchors_flat[pos % anchors_flat.shape[0]]
            pred_deltas = deltas.reshape(-1, 4)[pos].float()
            pred_ctr = ctr_logits.reshape(-1)[pos].float()
            ctr_targets = targets.centerness_targets
            pos_weights = None if image_weights is None else image_weights.float()[pos // anchors_flat.shape[0]]

            # Both reductions run on every rank, with or without local positives, as officially.
            world_size = comm.get_world_size()
            num_pos = _all_reduce_sum(torch.tensor(float(pos.numel()), device=token_logits.device))
            num_pos_avg = (num_pos / world_size).clamp(min=1.0)
            ctr_sum_avg = _all_reduce_sum(ctr_targets.sum()) / world_size

            token_loss = token_sigmoid_focal_loss(
                token_logits, targets.token_labels, text_mask, self.focal_alpha, self.focal_gamma, image_weights
            )
            reg_loss = giou_loss(
                self.box_coder.decode(pred_deltas, pos_anchors),
                self.box_coder.decode(targets.reg_targets, pos_anchors),
                ctr_targets if pos_weights is None else ctr_targets * pos_weights,
            )
            ctr_loss = F.binary_cross_entropy_with_logits(pred_ctr, ctr_targets, weight=pos_weights, reduction="sum")
        # Without local positives both sums are empty (0, still attached to the graph), as in the
        # official code; the floor only avoids 0 / 0 when no rank has a positive.
        return {
            "loss_dot_product_token": token_loss / num_pos_avg * self.token_loss_weight,
            "loss_reg": reg_loss / ctr_sum_avg.clamp(min=_TINY) * self.reg_loss_weight,
            "loss_centerness": ctr_loss / num_pos_avg * self.centerness_loss_weight,
        }


def _pad_boxes(gt_boxes: list[Tensor], like: Tensor) -> Tensor:
    """``(B, max N_i, 4)`` GT boxes in ``like``'s dtype, zero-padded, so positives can be gathered without a loop."""
    return pad_sequence([boxes.to(like) for boxes in gt_boxes], batch_first=True, padding_value=0.0)
