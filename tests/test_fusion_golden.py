"""Fusion modules against official GLIP golden vectors, plus tower gradient and padding checks."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig

from glipv2_d2.modeling.fusion import BiAttentionBlock, BiMultiHeadAttention, DyConv, VLDyHeadTower

from .conftest import params_via_converter, recorded_calls

TOL = {"rtol": 1e-4, "atol": 1e-4}


def _assert_levels_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for level, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m, lv=level: f"level {lv}: {m}")


@pytest.mark.parametrize("order", ["attend_projected", "attend_folded"])
@pytest.mark.parametrize("case_name", ["bi_attention", "bi_attention_clamp"])
def test_bi_attention_matches_official(golden: dict, case_name: str, order: str, monkeypatch) -> None:
    """Both orders of the attention's products reproduce the official block (the clamp case too)."""
    monkeypatch.setattr(BiMultiHeadAttention, "forward", getattr(BiMultiHeadAttention, order))
    case = golden[case_name]
    cfg = case["config"]
    block = BiAttentionBlock(cfg["v_dim"], cfg["l_dim"], cfg["embed_dim"], cfg["num_heads"],
                             dropout=cfg["dropout"], drop_path=cfg["drop_path"],
                             init_values=cfg["init_values"]).eval()
    block.load_state_dict(
        params_via_converter(case["params"], "rpn.head.dyhead_tower.3.b_attn.", "fusion.layers.1.b_attn."), strict=True
    )
    inputs = case["inputs"]
    with torch.no_grad():
        visual, lang = block(inputs["visual"], inputs["lang_hidden"], inputs["lang_masks"])
    _assert_levels_close(visual, case["outputs"]["visual"])
    torch.testing.assert_close(lang, case["outputs"]["lang_hidden"], **TOL)


@pytest.mark.parametrize("case_name", ["dyconv", "dyconv_odd_sizes"])
def test_dyconv_matches_official(golden: dict, case_name: str) -> None:
    case = golden[case_name]
    cfg = case["config"]
    dyconv = DyConv(cfg["in_channels"], cfg["out_channels"], use_dyrelu=cfg["use_dyrelu"],
                    use_deform=cfg["use_deform"]).eval()
    dyconv.load_state_dict(
        params_via_converter(case["params"], "rpn.head.dyhead_tower.5.", "fusion.layers.1.dyconv."), strict=True
    )
    # offset runs once per level; DyConv[2] (stride 2) on levels 0..3 for levels 1..4; DyConv[0] on
    # levels 1..4 for levels 0..3, before upsampling.
    probes = {
        "offset_mask_per_level": dyconv.offset,
        "conv2_from_finer_level": dyconv.DyConv[2],
        "conv0_from_coarser_level_before_upsample": dyconv.DyConv[0],
    }
    with torch.no_grad(), recorded_calls(probes) as calls:
        visual = dyconv(case["inputs"]["visual"])
    _assert_levels_close(visual, case["outputs"]["visual"])
    assert set(case["intermediates"]) <= set(probes)
    assert len(case["intermediates"]["offset_mask_per_level"]) == len(visual)
    for name, expected in case["intermediates"].items():
        _assert_levels_close([call.output for call in calls[name]], expected)


def _tiny_tower(attn_implementation: str | None = None, **kwargs) -> VLDyHeadTower:
    lang_config = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                             num_hidden_layers=1, vocab_size=50, attn_implementation=attn_implementation)
    return VLDyHeadTower(2, 32, lang_config, embed_dim=64, num_heads=4, **kwargs)


def _tiny_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sizes = [(8, 10), (4, 5), (2, 3), (1, 2), (1, 1)]
    features = [torch.randn(2, 32, h, w, generator=gen) for h, w in sizes]
    lang = torch.randn(2, 6, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return features, lang, mask


def _loss(features: list[torch.Tensor], lang: torch.Tensor) -> torch.Tensor:
    return sum((f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum() for f in features) + lang.pow(2).sum()


def test_tower_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    tower = _tiny_tower().train()
    features, lang, mask = _tiny_inputs()
    features = [f.requires_grad_() for f in features]
    out_features, out_lang = tower(features, lang, mask)
    _loss(out_features, out_lang).backward()
    missing = [n for n, p in tower.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in tower.parameters())
    assert all(f.grad is not None for f in features)


def test_tower_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    plain = _tiny_tower().train()
    ckpt = _tiny_tower(use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    features, lang, mask = _tiny_inputs()
    grads = []
    for tower in (plain, ckpt):
        torch.manual_seed(1)
        _loss(*tower(features, lang, mask)).backward()
        grads.append({n: p.grad for n, p in tower.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_tower_padding_to_longer_text_changes_nothing_real() -> None:
    """Dynamic padding proof: extra masked tokens (with arbitrary values) leave real outputs intact."""
    torch.manual_seed(0)
    tower = _tiny_tower().eval()
    features, lang, mask = _tiny_inputs()
    # Arbitrary values on the already padded positions and on 5 more padded tokens.
    gen = torch.Generator().manual_seed(7)
    lang_padded = torch.cat([lang, 10 * torch.randn(2, 5, 32, generator=gen)], dim=1)
    lang_padded[1, 4:6] = 10 * torch.randn(2, 32, generator=gen)
    mask_padded = torch.cat([mask, torch.zeros(2, 5, dtype=mask.dtype)], dim=1)
    layers = {f"layer{i}": layer for i, layer in enumerate(tower.layers)}
    with torch.no_grad(), recorded_calls(layers) as short_steps:
        tower(features, lang, mask)
    with torch.no_grad(), recorded_calls(layers) as long_steps:
        tower(features, lang_padded, mask_padded)
    real = mask.bool()
    assert all(len(calls) == 1 for calls in [*short_steps.values(), *long_steps.values()])
    for (sf, sl), (lf, ll) in zip([c[0].output for c in short_steps.values()],
                                  [c[0].output for c in long_steps.values()], strict=True):
        for a, b in zip(sf, lf, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ll[:, :6][real], sl[real], rtol=1e-5, atol=1e-5)


def test_tower_eager_and_sdpa_text_layers_agree() -> None:
    torch.manual_seed(0)
    sdpa = _tiny_tower().eval()
    eager = _tiny_tower(attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    assert (sdpa.attn_implementation, eager.attn_implementation) == ("sdpa", "eager")
    features, lang, mask = _tiny_inputs()
    with torch.no_grad():
        out_s, lang_s = sdpa(features, lang, mask)
        out_e, lang_e = eager(features, lang, mask)
    for a, b in zip(out_e, out_s, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lang_e, lang_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tower_runs_under_autocast(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    tower = _tiny_tower().eval()
    features, lang, mask = _tiny_inputs()
    with torch.no_grad():
        ref_f, ref_l = tower(features, lang, mask)
        with torch.autocast("cpu", dtype=dtype):
            out_f, out_l = tower(features, lang, mask)
    for a, b in zip(out_f, ref_f, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b, rtol=0.1, atol=0.1)
    torch.testing.assert_close(out_l.float(), ref_l, rtol=0.1, atol=0.1)
