"""Grounded detections drawn with Detectron2's Visualizer, readable however many boxes overlap:
one colour per phrase in every picture (boxes and masks alike; a hash of the phrase, so "dog" has
the same colour whatever else the prompt names), near-identical boxes drawn once with all their
labels, labels kept inside the image and clear of each other, and for long vocabularies numbered
labels with one legend beside the picture."""

from __future__ import annotations

import zlib

import numpy as np
import torch
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import VisImage, Visualizer
from PIL import Image, ImageDraw, ImageFont

from .detection_selection import select_detections

__all__ = [
    "LabelFittingVisualizer",
    "draw_caption",
    "draw_grounded_detections",
    "draw_legend",
    "near_identical_groups",
    "phrase_color",
]

NEAR_IDENTICAL_IOU = 0.9  # boxes overlapping this much are drawn once, with all their labels
MIN_PICTURE_SIDE = 640  # small images are drawn enlarged, so that labels cover less of them
LEGEND_MIN_PHRASES = 6  # from this many distinct phrases drawn, boxes get numbers and the picture a legend
_ALL_COLORS = colormap(rgb=True, maximum=1)
# Detectron2's palette without its greys and near-blacks, which vanish on photos and in the legend.
PHRASE_COLORS = _ALL_COLORS[(np.ptp(_ALL_COLORS, axis=1) > 0.2) & (_ALL_COLORS.max(axis=1) >= 0.4)]


def phrase_color(phrase: str) -> np.ndarray:
    """The same RGB colour (0..1) for a phrase in every picture and prompt: a CRC32 of its
    lower-cased text (Python's hash() changes between processes)."""
    key = " ".join(str(phrase).lower().split())
    return PHRASE_COLORS[zlib.crc32(key.encode("utf-8")) % len(PHRASE_COLORS)]


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


def draw_legend(picture: np.ndarray, phrases: list[str]) -> np.ndarray:
    """The picture with a legend strip on its right: "n phrase" per line in the phrase's colour,
    n being the number its boxes carry. The strip grows the canvas, so it never hides the image."""
    font = ImageFont.load_default(size=max(12, picture.shape[0] // 40))
    line = int(font.size * 1.4)
    lines = [f"{number} {phrase}" for number, phrase in enumerate(phrases, 1)]
    width = int(max(font.getlength(text) for text in lines)) + 3 * line
    height = max(picture.shape[0], line * (len(lines) + 1))
    canvas = Image.new("RGB", (picture.shape[1] + width, height), "white")
    canvas.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(canvas)
    left = picture.shape[1] + line // 2
    for row, (text, phrase) in enumerate(zip(lines, phrases)):
        top = line // 2 + row * line
        color = tuple(int(255 * v) for v in phrase_color(phrase))
        draw.rectangle((left, top, left + font.size, top + font.size), fill=color, outline="black")
        draw.text((left + int(1.5 * font.size), top), text, fill="black", font=font)
    return np.asarray(canvas)


def draw_grounded_detections(image_bgr: np.ndarray, instances: Instances, score_threshold: float) -> np.ndarray:
    """The RGB picture of every detection scoring at least score_threshold (Instances with
    pred_boxes, scores, pred_classes, pred_phrases, and pred_masks when the model segments): colour
    by phrase, masks filled in their box's colour, near-identical boxes drawn once with one label
    line per detection; from LEGEND_MIN_PHRASES distinct phrases on, labels are numbers and a
    legend names them."""
    keep = select_detections(instances, score_threshold)
    groups = near_identical_groups(keep.pred_boxes, keep.scores)
    phrases = list(dict.fromkeys(str(p) for p in keep.pred_phrases))
    numbered = len(phrases) >= LEGEND_MIN_PHRASES
    names = {phrase: str(number) if numbered else phrase for number, phrase in enumerate(phrases, 1)}
    boxes = [keep.pred_boxes.tensor[group[0]].tolist() for group in groups]
    labels = ["\n".join(f"{names[str(keep.pred_phrases[i])]} {float(keep.scores[i]):.2f}" for i in group)
              for group in groups]
    colors = [phrase_color(keep.pred_phrases[group[0]]) for group in groups]
    masks = [keep.pred_masks[group[0]].cpu().numpy() for group in groups] if keep.has("pred_masks") else None
    scale = max(1.0, MIN_PICTURE_SIDE / max(image_bgr.shape[:2]))
    visualizer = LabelFittingVisualizer(image_bgr[:, :, ::-1], scale=scale)
    drawn = visualizer.overlay_instances(boxes=np.asarray(boxes).reshape(-1, 4), labels=labels, masks=masks,
                                         assigned_colors=colors).get_image()
    return draw_legend(drawn, phrases) if numbered else drawn


def draw_caption(image_bgr: np.ndarray, caption: str, instances: Instances) -> np.ndarray:
    """The RGB picture of a generated caption, written at the top left, over its grounded phrases'
    boxes (Instances as ``draw_grounded_detections`` takes them, every one drawn)."""
    picture = draw_grounded_detections(image_bgr, instances, score_threshold=0.0)
    visualizer = Visualizer(picture)
    font_size = visualizer._default_font_size
    visualizer.draw_text(caption or "(empty caption)", (font_size * 0.5, font_size * 0.5),
                         horizontal_alignment="left", color="w", font_size=font_size)
    return visualizer.output.get_image()


def draw_answer(image_bgr: np.ndarray, question: str, answer: str, score: float, instances: Instances,
                score_threshold: float) -> np.ndarray:
    """The RGB picture of a question and its answer ("Q: ... / A: answer (score)", top left) over
    the boxes of the question's phrases and of the answer scoring at least score_threshold."""
    text = f"Q: {question}\nA: {answer} ({score:.2f})"
    return draw_caption(image_bgr, text, select_detections(instances, score_threshold))
