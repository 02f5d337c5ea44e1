"""The CPU gather version of modulated deformable conv equals torchvision's kernel, values and gradients."""

import pytest
import torch
from torchvision.ops import deform_conv2d

from glipv2_d2.modeling.fusion.deform_conv import deform_conv2d_gather, modulated_deform_conv2d
from glipv2_d2.modeling.fusion.dyconv import DyConv, ModulatedDeformConv


def _inputs(batch: int, channels: int, height: int, width: int, stride: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    x = torch.randn(batch, channels, height, width, generator=generator)
    offset = 3 * torch.randn(batch, 18, out_h, out_w, generator=generator)
    # Taps exactly on torchvision's boundaries (-1, H, W) and on integer grid points.
    offset[0, 0, 0, 0] = -1.0
    offset[0, 1, 0, 1] = float(width)
    offset[-1, 2, -1, -1] = float(height)
    offset[-1, 3, 1, 1] = 2.0
    mask = torch.rand(batch, 9, out_h, out_w, generator=generator)
    weight = 0.1 * torch.randn(5, channels, 3, 3, generator=generator)
    bias = torch.randn(5, generator=generator)
    return x, offset, weight, bias, mask


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(1, 4, 9, 11), (2, 3, 6, 5)])
def test_gather_equals_torchvision_values_and_gradients(shape, stride):
    tensors = _inputs(*shape, stride)
    ours = [t.clone().double().requires_grad_() for t in tensors]
    theirs = [t.clone().double().requires_grad_() for t in tensors]
    x, offset, weight, bias, mask = ours
    out = deform_conv2d_gather(x, offset, weight, bias, stride, 1, mask)
    x2, offset2, weight2, bias2, mask2 = theirs
    expected = deform_conv2d(x2, offset2, weight2, bias2, stride=stride, padding=1, mask=mask2)
    assert out.shape == expected.shape == (shape[0], 5, *offset.shape[-2:])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out * grad_out).sum().backward()
    (expected * grad_out).sum().backward()
    for name, a, b in zip(("x", "offset", "weight", "bias", "mask"), ours, theirs, strict=True):
        assert a.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-8, msg=f"gradient of {name}")


def test_gather_equals_torchvision_in_float32_at_pyramid_scale():
    x, offset, weight, bias, mask = _inputs(1, 64, 40, 60, 1, seed=3)
    out = deform_conv2d_gather(x, offset, weight, bias, 1, 1, mask)
    expected = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_modulated_conv_impls_agree_with_flat_prefix_offsets():
    """The coarser-level branch hands the conv an offset larger than its output (re-read flat)."""
    torch.manual_seed(0)
    conv = ModulatedDeformConv(4, 6, 3, stride=1, padding=1, impl="gather")
    x = torch.randn(2, 4, 3, 4)
    offset = torch.randn(2, 18, 6, 7)
    mask = torch.rand(2, 9, 6, 7)
    gathered = conv(x, offset, mask)
    conv.impl = "torchvision"
    torch.testing.assert_close(gathered, conv(x, offset, mask), rtol=1e-5, atol=1e-6)


def test_dyconv_tower_step_same_with_either_kernel():
    torch.manual_seed(0)
    dyconv = DyConv(32, 32, deform_impl="gather").eval()
    features = [torch.randn(2, 32, 12, 15), torch.randn(2, 32, 6, 8), torch.randn(2, 32, 3, 4)]
    with torch.no_grad():
        gathered = dyconv(features)
        for module in dyconv.modules():
            if isinstance(module, ModulatedDeformConv):
                module.impl = "torchvision"
        reference = dyconv(features)
    for a, b in zip(gathered, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unknown_impl_is_refused_by_name():
    with pytest.raises(ValueError, match="DEFORM_CONV_IMPL.*'cuda_v2'"):
        ModulatedDeformConv(4, 4, impl="cuda_v2")
    x, offset, weight, bias, mask = _inputs(1, 2, 4, 4, 1)
    with pytest.raises(ValueError, match="DEFORM_CONV_IMPL"):
        modulated_deform_conv2d(x, offset, weight, bias, 1, 1, mask, impl="fast")
