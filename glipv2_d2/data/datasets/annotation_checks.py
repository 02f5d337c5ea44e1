"""Load-time checks of one annotation's box and mask, shared by the dataset loaders.

A bad box or mask must be refused (an error naming it) or dropped with a counted warning when the
data is loaded: past the loader, Detectron2 flips a negative box into a valid-looking one, and a
degenerate mask only shows up later as an empty or misplaced loss target.
"""

import math
from typing import Any

__all__ = ["box_drop_reason", "mask_drop_reason"]

EMPTY_POLYGON_LIST = "an empty polygon list"
TOO_FEW_POINTS = "polygons of fewer than 3 points"
NON_FINITE = "NaN or infinite polygon coordinates"
OUTSIDE_IMAGE = "polygons entirely outside the image"


def box_drop_reason(anno: dict, record: dict, where: str) -> str | None:
    """Why a box cannot be trained on (None when it can); a malformed or negative-size box is an
    error, since Detectron2 would flip it into a different, valid-looking box."""
    if "bbox" not in anno:
        raise ValueError(f"{where}: has no 'bbox' (a 'segmentation' alone is not enough); add its box")
    box = anno["bbox"]
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
        raise ValueError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {box!r}")
    x, y, width, height = box
    if not all(math.isfinite(v) for v in box):
        return "NaN or infinite coordinates"
    if width < 0 or height < 0:
        raise ValueError(f"{where}: 'bbox' {box} has a negative width or height; COCO boxes are [x, y, w, h]")
    if width == 0 or height == 0:
        return "zero width or height"
    if x >= record["width"] or y >= record["height"] or x + width <= 0 or y + height <= 0:
        return "entirely outside the image"
    return None


def _check_rle(rle: dict, height: int, width: int, where: str) -> None:
    """An RLE of another size belongs to another image (or is corrupt): no crop or resize fixes it."""
    size = rle.get("size")
    if "counts" not in rle or not isinstance(size, (list, tuple)) or len(size) != 2:
        raise ValueError(
            f"{where}: an RLE 'segmentation' needs 'counts' and 'size' [height, width], got keys {sorted(rle)}"
        )
    if [int(size[0]), int(size[1])] != [height, width]:
        raise ValueError(
            f"{where}: RLE 'segmentation' of size {size[0]}x{size[1]} (height x width) on an image of "
            f"{height}x{width}; an RLE must cover exactly its image"
        )


def _polygon_problem(polygon: Any, height: int, width: int, where: str) -> str | None:
    """Why one flat [x0, y0, x1, y1, ...] polygon draws nothing on the image (None when it does)."""
    if not isinstance(polygon, (list, tuple)) or not all(isinstance(v, (int, float)) for v in polygon):
        raise ValueError(f"{where}: a polygon must be a flat list of numbers [x0, y0, x1, y1, ...], got {polygon!r}")
    if len(polygon) < 6 or len(polygon) % 2:
        return TOO_FEW_POINTS
    if not all(math.isfinite(v) for v in polygon):
        return NON_FINITE
    xs, ys = polygon[0::2], polygon[1::2]
    if min(xs) >= width or min(ys) >= height or max(xs) <= 0 or max(ys) <= 0:
        return OUTSIDE_IMAGE
    return None


def mask_drop_reason(anno: dict, height: int, width: int, where: str) -> str | None:
    """Check ``anno["segmentation"]`` against its image and clean it in place.

    Polygons that draw nothing (fewer than 3 points, non-finite, entirely outside the image) are
    removed; when none is left the annotation loses its "segmentation" (its box stays) and the
    reason is returned, for the loader's counted warning. An RLE of the wrong size, or a
    segmentation of no known form, is an error naming ``where``. None: the mask is kept as it is.
    """
    segmentation = anno.get("segmentation")
    if segmentation is None:
        anno.pop("segmentation", None)
        return None
    if isinstance(segmentation, dict):
        _check_rle(segmentation, height, width, where)
        return None
    if not isinstance(segmentation, (list, tuple)):
        raise ValueError(f"{where}: 'segmentation' must be a list of polygons or an RLE dict, got {segmentation!r}")
    if not segmentation:
        del anno["segmentation"]
        return EMPTY_POLYGON_LIST
    problems = [_polygon_problem(polygon, height, width, where) for polygon in segmentation]
    kept = [polygon for polygon, problem in zip(segmentation, problems) if problem is None]
    if kept:
        anno["segmentation"] = kept
        return None
    del anno["segmentation"]
    return problems[0]
