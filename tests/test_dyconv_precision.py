"""MODEL.DYHEAD.DYCONV_PRECISION: "fp32" keeps DyConv's official fp32 numerics under autocast,
"autocast" runs its deformable convs in the autocast dtype while the sampling offsets stay fp32."""

import pytest
import torch
from detectron2.modeling import build_model

from glipv2_d2.modeling.fusion.dyconv import DyConv, ModulatedDeformConv

from .test_fusion_golden import _tiny_inputs, _tiny_tower
from .tiny_model import tiny_cfg


def _levels(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 32, h, w, generator=gen) for h, w in [(12, 16), (6, 8), (3, 4)]]


def _dtypes_seen(block: DyConv, features: list[torch.Tensor]) -> dict[str, set[torch.dtype]]:
    """Output dtypes of the deformable convs and of the offset conv during one bf16 autocast pass."""
    seen: dict[str, set[torch.dtype]] = {"deform": set(), "offset": set()}
    hooks = [m.register_forward_hook(lambda m, i, o: seen["deform"].add(o.dtype))
             for m in block.modules() if isinstance(m, ModulatedDeformConv)]
    hooks.append(block.offset.register_forward_hook(lambda m, i, o: seen["offset"].add(o.dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        block(features)
    for hook in hooks:
        hook.remove()
    return seen


def test_fp32_precision_ignores_autocast_and_autocast_precision_follows_it():
    torch.manual_seed(0)
    official = DyConv(32, 32).eval()
    reduced = DyConv(32, 32, precision="autocast").eval()
    reduced.load_state_dict(official.state_dict())
    features = _levels()
    assert _dtypes_seen(official, features) == {"deform": {torch.float32}, "offset": {torch.float32}}
    assert _dtypes_seen(reduced, features) == {"deform": {torch.bfloat16}, "offset": {torch.float32}}
    with torch.no_grad():
        reference = official(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            same = official(features)
            rounded = reduced(features)
        unchanged = reduced(features)  # no autocast: fp32, as the official block
    for ref, a, b, c in zip(reference, same, rounded, unchanged, strict=True):
        torch.testing.assert_close(a, ref, rtol=0, atol=0)
        torch.testing.assert_close(c, ref, rtol=0, atol=0)
        error = (b.float() - ref).norm() / ref.norm()
        assert 0 < error < 0.02, error  # bf16 rounding (8 mantissa bits), not a different computation


def test_autocast_precision_trains_under_autocast():
    """Gradients reach every parameter of the tower through the bf16 deformable convs."""
    torch.manual_seed(0)
    tower = _tiny_tower(dyconv_precision="autocast").train()
    features, lang, mask = _tiny_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lang_out = tower(features, lang, mask)
        loss = sum(f.float().square().mean() for f in out) + lang_out.float().square().mean()
    loss.backward()
    missing = [n for n, p in tower.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    deform = [m for m in tower.modules() if isinstance(m, ModulatedDeformConv)]
    assert deform and all(m.weight.grad.abs().sum() > 0 for m in deform)


def test_unknown_precision_is_named():
    with pytest.raises(ValueError, match="DYCONV_PRECISION must be one of .*'half'"):
        DyConv(32, 32, precision="half")


@pytest.mark.parametrize("precision", ["fp32", "autocast"])
def test_config_key_reaches_every_fusion_layer(precision):
    cfg = tiny_cfg()
    cfg.MODEL.DYHEAD.DYCONV_PRECISION = precision
    blocks = [m for m in build_model(cfg).modules() if isinstance(m, DyConv)]
    assert len(blocks) == cfg.MODEL.DYHEAD.NUM_LAYERS
    assert all(b.follows_autocast == (precision == "autocast") for b in blocks)
