"""How far reduced-precision detections (bf16 / fp16 autocast) agree with fp32 ones on the same images.

Relative errors of logits say little about what a user sees; this counts the fp32 ("reference")
detections that the reduced-precision run ("candidate") also returns: same label, box at IoU >= a
threshold. Scores are not compared: a detection kept with a slightly different score is the same
detection to a user.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from detectron2.structures import Instances, pairwise_iou

__all__ = ["DetectionAgreement", "detection_agreement"]


@dataclass(frozen=True)
class DetectionAgreement:
    """``matched`` of the ``total`` reference detections (all images together) have a candidate match."""

    matched: int
    total: int

    @property
    def fraction(self) -> float:
        """matched / total; NaN without reference detections, so a check against it fails (nothing compared)."""
        return self.matched / self.total if self.total else float("nan")


def matched_reference(reference: Instances, candidate: Instances, iou_threshold: float) -> torch.Tensor:
    """Bool per reference detection: some candidate detection has its label and IoU >= ``iou_threshold``."""
    if len(reference) == 0 or len(candidate) == 0:
        return torch.zeros(len(reference), dtype=torch.bool)
    iou = pairwise_iou(reference.pred_boxes.to("cpu"), candidate.pred_boxes.to("cpu"))
    same_label = reference.pred_classes.cpu()[:, None] == candidate.pred_classes.cpu()[None, :]
    return ((iou >= iou_threshold) & same_label).any(dim=1)


def detection_agreement(
    reference: Sequence[Instances], candidate: Sequence[Instances], iou_threshold: float = 0.9
) -> DetectionAgreement:
    """The fraction of reference detections (e.g. fp32's kept detections, over all images) that the
    candidate run (e.g. bf16's) also finds: a candidate of the same image with the same
    ``pred_classes`` whose box has IoU >= ``iou_threshold`` with it.

    Not one-to-one: a candidate may match several reference detections. At IoU >= 0.9 after
    class-wise NMS at <= 0.6 (MODEL.ATSS.NMS_TH) that cannot happen: 1 - IoU is a metric, so two
    reference boxes within 0.1 of one candidate are within 0.2 of each other (IoU >= 0.8), and NMS
    left no same-label pair that close. Extra candidate detections are not penalised; run it both
    ways to see them.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference images but {len(candidate)} candidate images")
    matched = sum(int(matched_reference(r, c, iou_threshold).sum()) for r, c in zip(reference, candidate))
    return DetectionAgreement(matched=matched, total=sum(len(r) for r in reference))
