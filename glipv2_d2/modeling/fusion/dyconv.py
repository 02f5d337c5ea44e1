"""DyHead's DyConv block (deformable conv + scale attention + DyReLU) as official GLIP runs it.

Parameter names match ``DyConv`` / ``Conv3x3Norm`` in microsoft/GLIP
``maskrcnn_benchmark/modeling/rpn/vldyhead.py`` and ``DYReLU`` in ``layers/dyrelu.py``.
The modulated deformable conv is ``torchvision.ops.deform_conv2d`` with ``mask`` (no compiled
extension is needed) or, on the CPU, the equal gather + matmul of ``deform_conv.py``.

Precision (``MODEL.DYHEAD.DYCONV_PRECISION``): "fp32", official, runs the block in fp32 whatever
the autocast state; "autocast" lets it follow autocast, an opt-in speed lever whose detections are
checked against fp32 (tools/check_cuda.py, tests/test_precision_agreement.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deform_conv import DEFORM_CONV_IMPLS, modulated_deform_conv2d

# "fp32": official numerics under autocast; "autocast": the block follows autocast (see DyConv).
DYCONV_PRECISIONS = ("fp32", "autocast")

__all__ = ["DYCONV_PRECISIONS", "HSigmoid", "ModulatedDeformConv", "Conv3x3Norm", "DyReLU", "DyConv"]


class HSigmoid(nn.Module):
    """Hard sigmoid ``relu6(x + 3) / 6`` (official ``h_sigmoid`` with ``h_max=1``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(x + 3) / 6


def _flat_prefix(t: Tensor, height: int, width: int) -> Tensor:
    """Re-read each image's (C, H, W) block as flat memory laid out for a (C, height, width) map.

    This is what the official CUDA kernel does when handed an offset/mask tensor larger than its
    output; the released weights were trained with it, so it is reproduced rather than fixed.
    """
    b, c = t.shape[:2]
    needed = c * height * width
    if t[0].numel() < needed:
        raise ValueError(
            f"offset/mask of spatial size {tuple(t.shape[-2:])} is smaller than the conv output "
            f"({height}, {width}); pyramid levels must be successive ceil-halves"
        )
    return t.reshape(b, -1)[:, :needed].reshape(b, c, height, width)


class ModulatedDeformConv(nn.Module):
    """3x3-style modulated deformable conv (DCNv2) with official GLIP's init and fp32 compute.

    The official op is decorated with ``custom_fwd(cast_inputs=torch.float32)``, so it always runs
    in fp32; under autocast the fp32 result is kept (GroupNorm follows and autocasts to fp32 anyway),
    otherwise it is cast back to the input dtype. ``impl`` picks the kernel (see ``DEFORM_CONV_IMPLS``).

    ``reduced_precision``: under autocast, sample and multiply in the autocast dtype instead, with
    the gather kernel when ``impl`` is "auto" (torchvision's kernel computes in fp32 under autocast,
    and its CUDA kernel has no bf16). Sampling positions and bilinear weights are still computed in
    fp32 from fp32 offsets: in bf16 a position near 100 would be off by up to half a pixel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, bias: bool = True, impl: str = "auto", reduced_precision: bool = False):
        super().__init__()
        if impl not in DEFORM_CONV_IMPLS:
            raise ValueError(f"MODEL.DYHEAD.DEFORM_CONV_IMPL must be one of {DEFORM_CONV_IMPLS}, got {impl!r}")
        self.stride = stride
        self.padding = padding
        self.impl = impl
        self.reduced_precision = reduced_precision
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        k = self.weight.shape[-1]
        return ((height + 2 * self.padding - k) // self.stride + 1,
                (width + 2 * self.padding - k) // self.stride + 1)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """offset: (B, 2*k*k, h, w) with (dy, dx) per tap; mask: (B, k*k, h, w) in [0, 1].

        An offset/mask larger than the output is re-read flat, like the official CUDA kernel.
        """
        out_hw = self.output_size(*x.shape[-2:])
        if tuple(offset.shape[-2:]) != out_hw:
            offset = _flat_prefix(offset, *out_hw)
            mask = _flat_prefix(mask, *out_hw)
        device = x.device.type
        if self.reduced_precision and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            bias = None if self.bias is None else self.bias.to(dtype)
            impl = "gather" if self.impl == "auto" else self.impl
            return modulated_deform_conv2d(x.to(dtype), offset.float(), self.weight.to(dtype), bias, self.stride,
                                           self.padding, mask.float(), impl)
        bias = None if self.bias is None else self.bias.float()
        out = modulated_deform_conv2d(
            x.float(), offset.float(), self.weight.float(), bias, self.stride, self.padding, mask.float(), self.impl
        )
        if torch.is_autocast_enabled(x.device.type):
            return out
        return out.to(x.dtype)


class Conv3x3Norm(nn.Module):
    """3x3 conv (deformable or plain) followed by GroupNorm(16), official ``Conv3x3Norm``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, deformable: bool, use_gn: bool,
                 gn_groups: int = 16, deform_impl: str = "auto", reduced_precision: bool = False):
        super().__init__()
        if deformable:
            self.conv = ModulatedDeformConv(in_channels, out_channels, 3, stride=stride, padding=1, impl=deform_impl,
                                            reduced_precision=reduced_precision)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn = nn.GroupNorm(gn_groups, out_channels) if use_gn else None

    def forward(self, x: Tensor, offset: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        x = self.conv(x) if offset is None else self.conv(x, offset, mask)
        return x if self.bn is None else self.bn(x)


class DyReLU(nn.Module):
    """Dynamic ReLU (K=2 with bias): ``max(x*a1 + b1, x*a2 + b2)``, coefficients from global context."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4):
        super().__init__()
        self.out_channels = out_channels
        squeeze = in_channels // reduction
        self.fc = nn.Sequential(
            nn.Linear(in_channels, squeeze),
            nn.ReLU(inplace=True),
            nn.Linear(squeeze, out_channels * 4),
            HSigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        coeffs = self.fc(F.adaptive_avg_pool2d(x, 1).view(b, c)).view(b, -1, 1, 1)
        a1, b1, a2, b2 = torch.split(coeffs, self.out_channels, dim=1)
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        return torch.max(x * a1 + (b1 - 0.5), x * a2 + (b2 - 0.5))


class DyConv(nn.Module):
    """One DyHead vision step over a feature pyramid (finest level first).

    For level l: A = conv1(level l), B = conv2 stride 2 (level l-1), C = up(conv0(level l+1)), with
    bilinear ``align_corners=True`` upsampling. With deformable convs all three branches use the
    offset/mask computed on level l; for C that buffer is larger than the conv output and is
    re-read flat (official CUDA-kernel behaviour, see ``_flat_prefix``). Branches are weighted by
    a per-image hard-sigmoid scale attention, averaged, then passed through DyReLU.

    Precision "fp32" (default): the deformable convs run in fp32 regardless of autocast (as
    official). The rest is cheap next to them (a 27-channel offset conv, heads on pooled vectors), so
    the whole block runs outside autocast in the parameters' dtype. Official AMP ran those pieces in
    half precision; in bf16 that drifted ~0.8% per block (random weights), ~11% after a 6-layer
    tower, whereas here autocast leaves DyConv's fp32 numerics unchanged.
    Precision "autocast": under autocast the block follows it, deformable convs included (see
    ``ModulatedDeformConv``); only the offset/mask conv stays fp32, since it places the samples.
    """

    def __init__(self, in_channels: int = 256, out_channels: int = 256, use_dyrelu: bool = True,
                 use_deform: bool = True, use_gn: bool = True, deform_impl: str = "auto", precision: str = "fp32"):
        super().__init__()
        if precision not in DYCONV_PRECISIONS:
            raise ValueError(f"MODEL.DYHEAD.DYCONV_PRECISION must be one of {DYCONV_PRECISIONS}, got {precision!r}")
        self.follows_autocast = precision == "autocast"
        self.DyConv = nn.ModuleList(
            Conv3x3Norm(in_channels, out_channels, stride, deformable=use_deform, use_gn=use_gn,
                        deform_impl=deform_impl, reduced_precision=self.follows_autocast)
            for stride in (1, 1, 2)
        )
        self.AttnConv = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, 1, kernel_size=1),
            nn.ReLU(inplace=True),
        )
        self.h_sigmoid = HSigmoid()
        self.relu = DyReLU(in_channels, out_channels) if use_dyrelu else nn.ReLU()
        self.offset = nn.Conv2d(in_channels, 27, kernel_size=3, padding=1) if use_deform else None
        # Official init touches only nn.Conv2d: plain branch convs and AttnConv, not deformable ones.
        for m in [*self.DyConv.modules(), *self.AttnConv.modules()]:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features: list of (B, C, H_l, W_l), each level the ceil-half of the previous one."""
        device = features[0].device.type
        if self.follows_autocast and torch.is_autocast_enabled(device):
            return self._run_levels(list(features))
        dtype = self.DyConv[1].conv.weight.dtype
        with torch.autocast(device, enabled=False):
            return self._run_levels([f.to(dtype) for f in features])

    def _offsets_and_masks(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """The (B, 18, H, W) tap offsets and (B, 9, H, W) tap masks computed on ``feature``; in fp32
        when the block follows autocast."""
        if self.follows_autocast and torch.is_autocast_enabled(feature.device.type):
            with torch.autocast(feature.device.type, enabled=False):
                offset_mask = self.offset(feature.to(self.offset.weight.dtype))
        else:
            offset_mask = self.offset(feature)
        return offset_mask[:, :18], offset_mask[:, 18:].sigmoid()

    def _run_levels(self, features: list[Tensor]) -> list[Tensor]:
        outputs = []
        for level, feature in enumerate(features):
            offset = mask = None
            if self.offset is not None:
                offset, mask = self._offsets_and_masks(feature)

            branches = [self.DyConv[1](feature, offset, mask)]
            if level > 0:
                finer = self.DyConv[2](features[level - 1], offset, mask)
                if finer.shape[-2:] != feature.shape[-2:]:
                    raise ValueError(
                        f"level {level} has size {tuple(feature.shape[-2:])} but the stride-2 conv of "
                        f"level {level - 1} gives {tuple(finer.shape[-2:])}; levels must be ceil-halves"
                    )
                branches.append(finer)
            if level < len(features) - 1:
                coarser = self.DyConv[0](features[level + 1], offset, mask)
                branches.append(
                    F.interpolate(coarser, size=feature.shape[-2:], mode="bilinear", align_corners=True)
                )

            stacked = torch.stack(branches)
            scale = self.h_sigmoid(torch.stack([self.AttnConv(x) for x in branches]))
            outputs.append(torch.mean(stacked * scale, dim=0))
        return [self.relu(x) for x in outputs]
