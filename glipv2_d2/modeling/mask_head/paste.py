"""Paste 28x28 mask probabilities into the image, exactly as GLIP's ``Masker`` does.

Detectron2's ``paste_masks_in_image`` is not used on purpose: it samples the box exactly, while
GLIP pads the mask by one pixel, enlarges the box by 30/28, truncates it to integers and resizes
the padded mask to the integer box (+1 sides). The two differ on mask edges.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["legacy_paste_boxes", "paste_masks"]

PADDING = 1  # zero pixels added around each mask before resizing


def legacy_paste_boxes(boxes: Tensor, mask_size: int, padding: int = PADDING) -> Tensor:
    """``(N, 4)`` float boxes -> the int64 boxes the padded masks are resized onto: scaled about
    their centre by ``(M + 2 * padding) / M`` (half-sides without +1), truncated toward zero."""
    scale = float(mask_size + 2 * padding) / mask_size
    boxes = boxes.float()
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    center_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    center_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    expanded = torch.stack((center_x - half_w, center_y - half_h, center_x + half_w, center_y + half_h), dim=1)
    return expanded.to(torch.int32).to(torch.int64)


def paste_masks(probs: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5) -> Tensor:
    """``(N, 1, M, M)`` probabilities in ``(N, 4)`` xyxy boxes -> ``(N, height, width)`` bool masks.

    A pixel is foreground when its bilinearly resized probability is strictly above ``threshold``;
    parts of a box outside the image are cut off.
    """
    if probs.dim() != 4 or probs.shape[1] != 1 or probs.shape[2] != probs.shape[3] or len(probs) != len(boxes):
        raise ValueError(
            f"paste_masks needs (N, 1, M, M) probabilities and (N, 4) boxes, got {tuple(probs.shape)} and "
            f"{tuple(boxes.shape)}"
        )
    mask_size = probs.shape[-1]
    padded = F.pad(probs.float(), (PADDING,) * 4)
    result = torch.zeros((len(probs), height, width), dtype=torch.bool, device=probs.device)
    for index, (x1, y1, x2, y2) in enumerate(legacy_paste_boxes(boxes, mask_size).tolist()):
        box_w, box_h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        resized = F.interpolate(padded[index : index + 1], size=(box_h, box_w), mode="bilinear", align_corners=False)
        foreground = resized[0, 0] > threshold
        left, top = max(x1, 0), max(y1, 0)
        right, bottom = min(x2 + 1, width), min(y2 + 1, height)
        if right > left and bottom > top:
            result[index, top:bottom, left:right] = foreground[top - y1 : bottom - y1, left - x1 : right - x1]
    return result
