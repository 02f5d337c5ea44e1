"""Image resizing exactly as maskrcnn_benchmark (and so GLIP) sizes its inputs."""

import random
from collections.abc import Sequence

from detectron2.config import CfgNode
from detectron2.data import transforms as T
from PIL import Image


def legacy_resized_hw(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) of maskrcnn_benchmark's Resize.get_size.

    Detectron2's ResizeShortestEdge rounds both sides; the official rule rounds the clamped short
    edge and truncates the long one, so sizes can differ by a pixel — enough to shift every anchor.
    """
    short, long = min(height, width), max(height, width)
    if long / short * short_edge > max_size:
        short_edge = int(round(max_size * short / long))
    if short == short_edge:
        return height, width
    if width < height:
        return int(short_edge * height / width), short_edge
    return short_edge, int(short_edge * width / height)


class LegacyResizeShortestEdge(T.Augmentation):
    """Shortest-edge resize (a random choice among `short_edge_lengths`) with the official size rule."""

    def __init__(self, short_edge_lengths: Sequence[int], max_size: int, interp: int = Image.BILINEAR):
        super().__init__()
        self.short_edge_lengths = tuple(short_edge_lengths)
        self.max_size = max_size
        self.interp = interp

    def get_transform(self, image) -> T.Transform:
        height, width = image.shape[:2]
        new_h, new_w = legacy_resized_hw(height, width, random.choice(self.short_edge_lengths), self.max_size)
        return T.ResizeTransform(height, width, new_h, new_w, self.interp)


def build_test_resize(cfg: CfgNode) -> T.Augmentation:
    """The test-time resize chosen by cfg.INPUT.LEGACY_RESIZE."""
    if cfg.INPUT.LEGACY_RESIZE:
        return LegacyResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    return T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
