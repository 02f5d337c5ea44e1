"""Grounded detections drawn with Detectron2's Visualizer, readable however many boxes overlap:
one colour per category in every picture (boxes and masks alike), near-identical boxes drawn once
with all their labels, labels kept inside the image and clear of each other."""

from __future__ import annotations

import numpy as np
import torch
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import VisImage, Visualizer

__all__ = [
    "LabelFittingVisualizer",
    "category_color",
    "draw_caption",
    "draw_grounded_detections",
    "near_identical_groups",
]

NEAR_IDENTICAL_IOU = 0.9  # boxes overlapping this much are drawn once, with all their labels
MIN_PICTURE_SIDE = 640  # small images are drawn enlarged, so that labels cover less of them
CATEGORY_COLORS = colormap(rgb=True, maximum=1)


def category_color(label: int) -> np.ndarray:
    """The same RGB colour (0..1) for every box of a category, in every picture."""
    return CATEGORY_COLORS[label % len(CATEGORY_COLORS)]


def near_identical_groups(boxes: Boxes, scores: torch.Tensor) -> list[list[int]]:
    """Indices grouped best score first, each group the boxes overlapping its best one by
    NEAR_IDENTICAL_IOU or more: one box per group is drawn, so their labels do not stack."""
    iou = pairwise_iou(boxes, boxes)
    order = torch.argsort(scores, descending=True).tolist()
    grouped: set[int] = set()
    groups: list[list[int]] = []
    for best in order:
        if best in grouped:
            continue
        group = [i for i in order if i not in grouped and iou[best, i] >= NEAR_IDENTICAL_IOU]
        grouped.update(group)
        groups.append(group)
    return groups


class LabelFittingVisualizer(Visualizer):
    """Detectron2's Visualizer whose labels lie fully inside the image and clear of the labels drawn
    before them: moved below (else above) an overlapped label, kept in place when there is no room."""

    def __init__(self, img_rgb: np.ndarray, scale: float = 1.0):
        super().__init__(img_rgb, scale=scale)
        self.label_extents: list[tuple[float, float, float, float]] = []

    def draw_text(self, text: str, position: tuple[float, float], **kwargs) -> VisImage:
        output = super().draw_text(text, position, **kwargs)
        label = output.ax.texts[-1]
        left, top, right, bottom = self._extent(label)
        shift_x = max(0.0, -left) - max(0.0, right - output.width)
        shift_y = max(0.0, -top) - max(0.0, bottom - output.height)
        extent = (left + shift_x, top + shift_y, right + shift_x, bottom + shift_y)
        height = extent[3] - extent[1]
        for placed in sorted(self.label_extents, key=lambda other: other[1]):
            if not _overlap(extent, placed):
                continue
            if placed[3] + height <= output.height:
                extent = (extent[0], placed[3], extent[2], placed[3] + height)
            elif placed[1] - height >= 0:
                extent = (extent[0], placed[1] - height, extent[2], placed[1])
        x, y = label.get_position()
        label.set_position((x + extent[0] - left, y + extent[1] - top))
        self.label_extents.append(extent)
        return output

    def _extent(self, label) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of a drawn label and its background, in image pixels."""
        box = label.get_window_extent(renderer=self.output.canvas.get_renderer()).padded(2 * self.output.scale)
        (x0, y0), (x1, y1) = self.output.ax.transData.inverted().transform(box.get_points())
        return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_grounded_detections(image_bgr: np.ndarray, instances: Instances, score_threshold: float) -> np.ndarray:
    """The RGB picture of every detection scoring at least score_threshold (Instances with
    pred_boxes, scores, pred_classes, pred_phrases, and pred_masks when the model segments): colour
    by category, masks filled in their box's colour, near-identical boxes drawn once with one label
    line per detection."""
    keep = instances[(instances.scores >= score_threshold).cpu().numpy()]
    groups = near_identical_groups(keep.pred_boxes, keep.scores)
    boxes = [keep.pred_boxes.tensor[group[0]].tolist() for group in groups]
    labels = ["\n".join(f"{keep.pred_phrases[i]} {float(keep.scores[i]):.2f}" for i in group) for group in groups]
    colors = [category_color(int(keep.pred_classes[group[0]])) for group in groups]
    masks = [keep.pred_masks[group[0]].cpu().numpy() for group in groups] if keep.has("pred_masks") else None
    scale = max(1.0, MIN_PICTURE_SIDE / max(image_bgr.shape[:2]))
    visualizer = LabelFittingVisualizer(image_bgr[:, :, ::-1], scale=scale)
    drawn = visualizer.overlay_instances(boxes=np.asarray(boxes).reshape(-1, 4), labels=labels, masks=masks,
                                         assigned_colors=colors)
    return drawn.get_image()


def draw_caption(image_bgr: np.ndarray, caption: str, instances: Instances) -> np.ndarray:
    """The RGB picture of a generated caption, written at the top left, over its grounded phrases'
    boxes (Instances as ``draw_grounded_detections`` takes them, every one drawn)."""
    picture = draw_grounded_detections(image_bgr, instances, score_threshold=0.0)
    visualizer = Visualizer(picture)
    font_size = visualizer._default_font_size
    visualizer.draw_text(caption or "(empty caption)", (font_size * 0.5, font_size * 0.5),
                         horizontal_alignment="left", color="w", font_size=font_size)
    return visualizer.output.get_image()

