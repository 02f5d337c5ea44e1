"""Modulated deformable convolution (DCNv2) as a gather + one matrix product, for the CPU.

torchvision's ``deform_conv2d`` builds its column buffer in a single-threaded loop on the CPU,
which made it 45% of a GLIP-T forward there. This version samples the same bilinear taps with
``F.embedding_bag`` (a multi-threaded gather that sums the four weighted corners of every tap in
one pass over a channels-last copy of the input) and contracts them with the weight in one matmul:
3.6x faster with 2 threads on the finest GLIP-T level, equal to torchvision to ~2e-7 relative.

Sampling follows torchvision's kernel exactly: a tap at ``(y, x)`` reads nothing when
``y <= -1``, ``y >= H``, ``x <= -1`` or ``x >= W``; otherwise each of its four corners that lies
inside the image contributes with its bilinear weight, and the sum is scaled by the tap's mask.
Everything is differentiable with autograd (offsets through the bilinear weights, as in DCN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import deform_conv2d

__all__ = ["DEFORM_CONV_IMPLS", "deform_conv2d_gather", "modulated_deform_conv2d"]

# "auto": the gather version on the CPU, torchvision's kernel elsewhere (its CUDA kernel is parallel).
DEFORM_CONV_IMPLS = ("auto", "torchvision", "gather")


def _tap_positions(offset: Tensor, kernel: tuple[int, int], stride: int, padding: int) -> tuple[Tensor, Tensor]:
    """Sampling rows and columns ``(B, kh*kw, h, w)`` of every tap: grid position + kernel tap + offset.

    The integer part is summed first and the offset added last, as torchvision does, so the
    positions are bit-identical to its kernel's.
    """
    batch, _, height, width = offset.shape
    kh, kw = kernel
    device = offset.device
    tap_y = torch.arange(kh, device=device).repeat_interleave(kw)
    tap_x = torch.arange(kw, device=device).repeat(kh)
    grid_y = torch.arange(height, device=device) * stride - padding
    grid_x = torch.arange(width, device=device) * stride - padding
    offset = offset.view(batch, kh * kw, 2, height, width)
    rows = (grid_y[None, None, :, None] + tap_y[None, :, None, None]) + offset[:, :, 0]
    cols = (grid_x[None, None, None, :] + tap_x[None, :, None, None]) + offset[:, :, 1]
    return rows, cols


def _corner_indices_and_weights(
    rows: Tensor, cols: Tensor, mask: Tensor, height: int, width: int
) -> tuple[Tensor, Tensor]:
    """Flat input indices and mask-scaled bilinear weights of the four corners, ``(..., 4)`` each.

    A corner outside the image points at index ``height * width`` (an all-zero row appended to
    the input) so that every tap has exactly four entries.
    """
    inside = (rows > -1) & (rows < height) & (cols > -1) & (cols < width)
    top, left = rows.floor(), cols.floor()
    frac_y, frac_x = rows - top, cols - left
    top, left = top.long(), left.long()
    tap_weight = mask * inside
    indices, weights = [], []
    for dy, dx, bilinear in (
        (0, 0, (1 - frac_y) * (1 - frac_x)),
        (0, 1, (1 - frac_y) * frac_x),
        (1, 0, frac_y * (1 - frac_x)),
        (1, 1, frac_y * frac_x),
    ):
        y, x = top + dy, left + dx
        valid = (y >= 0) & (y < height) & (x >= 0) & (x < width)
        indices.append(torch.where(valid, y * width + x, height * width))
        weights.append(bilinear * tap_weight)
    return torch.stack(indices, dim=-1), torch.stack(weights, dim=-1)


def deform_conv2d_gather(
    x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, mask: Tensor
) -> Tensor:
    """``torchvision.ops.deform_conv2d(x, offset, weight, bias, stride, padding, mask=mask)`` for one
    offset group, no dilation and no groups (what DyHead uses); the output size is the offset's."""
    batch, channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    out_h, out_w = offset.shape[-2:]
    taps = kh * kw
    rows, cols = _tap_positions(offset, (kh, kw), stride, padding)
    indices, weights = _corner_indices_and_weights(
        rows, cols, mask.view(batch, taps, out_h, out_w), height, width
    )
    # (B, K, h, w, 4) -> (B, h, w, K, 4): the K taps of one output position become one row of columns.
    indices = indices.permute(0, 2, 3, 1, 4)
    weights = weights.permute(0, 2, 3, 1, 4)
    image_start = torch.arange(batch, device=x.device) * (height * width + 1)
    indices = indices + image_start[:, None, None, None, None]
    table = torch.cat([x.flatten(2).transpose(1, 2), x.new_zeros(batch, 1, channels)], dim=1)
    columns = F.embedding_bag(
        indices.reshape(-1, 4), table.reshape(-1, channels),
        per_sample_weights=weights.reshape(-1, 4).to(x.dtype), mode="sum",
    ).view(batch, out_h * out_w, taps * channels)
    # Columns are ordered (tap, channel); torchvision's are (channel, tap): permute the weight to match.
    kernel = weight.permute(0, 2, 3, 1).reshape(out_channels, taps * channels)
    out = torch.matmul(kernel, columns.transpose(1, 2)).view(batch, out_channels, out_h, out_w)
    return out if bias is None else out + bias[None, :, None, None]


def modulated_deform_conv2d(
    x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, mask: Tensor,
    impl: str = "auto",
) -> Tensor:
    """DCNv2 with the implementation ``impl`` (one of ``DEFORM_CONV_IMPLS``)."""
    if impl not in DEFORM_CONV_IMPLS:
        raise ValueError(f"MODEL.DYHEAD.DEFORM_CONV_IMPL must be one of {DEFORM_CONV_IMPLS}, got {impl!r}")
    if impl == "gather" or (impl == "auto" and x.device.type == "cpu"):
        return deform_conv2d_gather(x, offset, weight, bias, stride, padding, mask)
    return deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding, mask=mask)
