"""Referring segmentation metrics of PhraseCut (Wu et al. 2020), as its official evaluation defines them.

For every evaluated phrase the prediction is ONE binary mask and the ground truth the union of
the masks of every instance the phrase refers to. The official Evaluator (ChenyunWu/PhraseCutDataset,
utils/evaluator.py and utils/iou.py) then reports, over all phrases:

- mean IoU: the mean of the per-phrase IoUs, where a phrase with an empty intersection scores 0;
- cumulative IoU: the sum of the intersections over the sum of the unions (pixels, all phrases);
- precision at IoU t ("pred_mask_acc"): the fraction of phrases whose IoU is strictly above t.

A grounding model predicts scored instances, so the phrase's mask is made here: the union of the
masks of its detections scoring at least ``score_threshold``, or the best one's alone when none
does, or nothing when it has no detection. ``use_boxes`` takes each detection's filled box as its
mask instead, the trivial baseline a mask head has to beat (and what a box-only model can report).

Ground-truth polygons are drawn as the official code draws them (PIL, vertices truncated to
integers, outline included), so the numbers are the official evaluation's on the same masks; RLE
ground truth (e.g. synthetic data) is decoded with pycocotools. Results are percentages:
{"phrasecut": {"mIoU", "cIoU", "Pr@0.5", "Pr@0.7", "Pr@0.9"}} ("phrasecut_box" with boxes).
"""

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Instances
from PIL import Image, ImageDraw

from .per_image_records import check_each_image_once, gather_per_image

__all__ = [
    "PhraseCutEvaluator",
    "PhraseOverlap",
    "boxes_to_masks",
    "ground_truth_mask",
    "image_phrase_overlaps",
    "phrase_prediction_mask",
    "referring_metrics",
]

logger = logging.getLogger(__name__)

IOU_THRESHOLDS = (0.5, 0.7, 0.9)


@dataclass(frozen=True)
class PhraseOverlap:
    """Pixels of one phrase's predicted and ground-truth masks: all the split's metrics need."""

    intersection: int
    union: int

    @property
    def iou(self) -> float:
        """The official per-phrase IoU: 0 when nothing overlaps (also when both masks are empty)."""
        return self.intersection / self.union if self.intersection > 0 else 0.0


def _describe(image_id: Hashable) -> str:
    return f"PhraseCut evaluation, image_id {image_id!r}"


def boxes_to_masks(boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) bool: each XYXY box filled, a pixel belonging to it when its centre lies inside
    (an integer box [x0, y0, x1, y1] covers columns x0..x1-1 and rows y0..y1-1)."""
    height, width = image_hw
    columns = torch.arange(width, dtype=torch.float64) + 0.5
    rows = torch.arange(height, dtype=torch.float64) + 0.5
    boxes = boxes.to(torch.float64)
    inside_x = (columns[None] >= boxes[:, 0:1]) & (columns[None] < boxes[:, 2:3])  # (N, W)
    inside_y = (rows[None] >= boxes[:, 1:2]) & (rows[None] < boxes[:, 3:4])  # (N, H)
    return inside_y[:, :, None] & inside_x[:, None, :]


def phrase_prediction_mask(
    instances: Instances, label: int, score_threshold: float, use_boxes: bool = False
) -> torch.Tensor:
    """(H, W) bool: the union of the masks of the detections labelled ``label`` scoring at least
    ``score_threshold``; the top-scoring one alone when none does; empty without detections."""
    height, width = instances.image_size
    own = instances.pred_classes == label
    if not own.any():
        return torch.zeros((height, width), dtype=torch.bool)
    scores = instances.scores[own]
    chosen = scores >= score_threshold
    if not chosen.any():
        chosen = torch.zeros_like(chosen)
        chosen[scores.argmax()] = True
    if use_boxes:
        masks = boxes_to_masks(instances.pred_boxes.tensor[own][chosen], (height, width))
    else:
        masks = instances.pred_masks[own][chosen].bool()
    return masks.any(dim=0)


def _polygon_mask(polygons: Sequence[Sequence[float]], image_hw: tuple[int, int]) -> np.ndarray:
    """PhraseCut's polygons_to_mask: PIL polygons (outline drawn) at integer-truncated vertices."""
    height, width = image_hw
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        points = [(int(x), int(y)) for x, y in zip(polygon[0::2], polygon[1::2])]
        if len(points) >= 2:
            draw.polygon(points, outline=1, fill=1)
    return np.asarray(canvas, dtype=bool)


def _annotation_mask(annotation: dict, image_hw: tuple[int, int], where: str) -> np.ndarray:
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list):
        return _polygon_mask(segmentation, image_hw)
    if isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle.get("counts"), list):
            rle = mask_util.frPyObjects(rle, *rle["size"])
        mask = mask_util.decode(rle).astype(bool)
        if mask.shape != tuple(image_hw):
            raise ValueError(f"{where}: RLE of size {mask.shape} on an image of size {tuple(image_hw)}")
        return mask
    raise ValueError(f"{where}: no polygon or RLE 'segmentation'; referring segmentation needs ground-truth masks")


def ground_truth_mask(annotations: Sequence[dict], phrase_id: Hashable, image_hw: tuple[int, int], where: str):
    """(H, W) bool tensor: the union of the masks of the annotations whose "phrase_ids" hold
    ``phrase_id``, or None when the phrase has no annotation (nothing to segment: not evaluated)."""
    members = [a for a in annotations if phrase_id in a.get("phrase_ids", ())]
    if not members:
        return None
    union = np.zeros(image_hw, dtype=bool)
    for index, annotation in enumerate(members):
        union |= _annotation_mask(annotation, image_hw, f"{where}, annotation #{index} of phrase {phrase_id!r}")
    return torch.from_numpy(union)


def _check_masks(instances: Instances, image_hw: tuple[int, int], use_boxes: bool, where: str) -> None:
    if use_boxes or len(instances) == 0:
        return
    if not instances.has("pred_masks"):
        raise ValueError(
            f"{where}: the model output has no pred_masks; run with MODEL.MASK_ON (a mask head) or "
            "evaluate filled boxes (use_boxes=True)"
        )
    if tuple(instances.pred_masks.shape[1:]) != tuple(image_hw):
        raise ValueError(
            f"{where}: pred_masks of size {tuple(instances.pred_masks.shape[1:])} on an image of size "
            f"{tuple(image_hw)}; masks must be pasted at the output (original image) size"
        )


def image_phrase_overlaps(
    input_dict: dict, instances: Instances, score_threshold: float, use_boxes: bool = False
) -> list[PhraseOverlap]:
    """Overlaps of every phrase of one input that has ground truth. Labels of the predictions are
    indices into the input's "phrases" (GroundingMapper's test prompts); annotations belong to a
    phrase through their "phrase_ids" (its "phrase_id"), in original image pixels."""
    image_id = input_dict.get("image_id")
    where = _describe(image_id)
    for key in ("phrases", "annotations", "height", "width"):
        if key not in input_dict:
            raise KeyError(f"{where}: the input has no {key!r}; the test mapper must keep the dataset dict's")
    image_hw = (int(input_dict["height"]), int(input_dict["width"]))
    if tuple(instances.image_size) != image_hw:
        raise ValueError(f"{where}: predictions of image size {tuple(instances.image_size)}, input {image_hw}")
    _check_masks(instances, image_hw, use_boxes, where)
    overlaps = []
    for label, phrase in enumerate(input_dict["phrases"]):
        truth = ground_truth_mask(input_dict["annotations"], phrase["phrase_id"], image_hw, where)
        if truth is None:
            continue
        predicted = phrase_prediction_mask(instances, label, score_threshold, use_boxes)
        overlaps.append(PhraseOverlap(int((predicted & truth).sum()), int((predicted | truth).sum())))
    return overlaps


def referring_metrics(overlaps: Sequence[PhraseOverlap], iou_thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict:
    """mIoU, cIoU and Pr@t in percent, as the official analyze_stats computes them (IoU > t)."""
    ious = np.array([o.iou for o in overlaps], dtype=np.float64)
    total_union = sum(o.union for o in overlaps)
    results = {
        "mIoU": 100.0 * float(ious.mean()),
        "cIoU": 100.0 * sum(o.intersection for o in overlaps) / total_union if total_union else 0.0,
    }
    for threshold in iou_thresholds:
        results[f"Pr@{threshold}"] = 100.0 * float((ious > threshold).mean())
    return results


class PhraseCutEvaluator(DatasetEvaluator):
    """PhraseCut's referring-segmentation metrics as a Detectron2 evaluator.

    Inputs are grounding records (datasets/phrasecut.py: "image_id" unique per phrase-image pair,
    "phrases", "annotations" with "phrase_ids" and "segmentation", "height", "width"); outputs'
    Instances carry scores, pred_classes (index into the input's "phrases") and pred_masks
    (bool, original image size) or, with ``use_boxes``, pred_boxes. Results are
    {"phrasecut": {...}} (masks) or {"phrasecut_box": {...}} (filled boxes), see ``referring_metrics``.
    """

    def __init__(
        self,
        score_threshold: float = 0.5,
        use_boxes: bool = False,
        iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
        distributed: bool = True,
    ):
        if not all(0.0 <= t < 1.0 for t in iou_thresholds):
            raise ValueError(f"iou_thresholds must lie in [0, 1), got {tuple(iou_thresholds)}")
        self.score_threshold = score_threshold
        self.use_boxes = use_boxes
        self.iou_thresholds = tuple(iou_thresholds)
        self._distributed = distributed
        self._per_image: list[tuple[Hashable, list[PhraseOverlap]]] = []

    @property
    def result_key(self) -> str:
        return "phrasecut_box" if self.use_boxes else "phrasecut"

    def reset(self) -> None:
        self._per_image = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for input_dict, output in zip(inputs, outputs):
            instances = output["instances"].to("cpu")
            overlaps = image_phrase_overlaps(input_dict, instances, self.score_threshold, self.use_boxes)
            self._per_image.append((input_dict.get("image_id"), overlaps))

    def evaluate(self) -> dict:
        per_image = gather_per_image(self._per_image, self._distributed)
        if per_image is None:
            return {}
        check_each_image_once(per_image, "PhraseCut evaluation", "phrase-image record")
        overlaps = [overlap for _, image_overlaps in per_image for overlap in image_overlaps]
        if not overlaps:
            logger.warning("PhraseCut evaluation: no phrase with a ground-truth mask was evaluated")
            return {}
        source = "filled boxes" if self.use_boxes else "masks"
        logger.info(f"PhraseCut ({source}, score >= {self.score_threshold}): {len(overlaps)} phrases")
        return {self.result_key: referring_metrics(overlaps, self.iou_thresholds)}
