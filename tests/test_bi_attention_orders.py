"""The folded order of the bidirectional attention's products equals the official projected order."""

import pytest
import torch

from glipv2_d2.modeling.fusion import BiMultiHeadAttention


def _attention(v_dim: int = 16, l_dim: int = 12, embed_dim: int = 32, heads: int = 4, dropout: float = 0.0):
    torch.manual_seed(0)
    attention = BiMultiHeadAttention(v_dim, l_dim, embed_dim, heads, dropout=dropout)
    with torch.no_grad():  # non-zero biases, so that the folded bias terms are exercised
        for proj in (attention.v_proj, attention.l_proj, attention.values_v_proj, attention.values_l_proj,
                     attention.out_v_proj, attention.out_l_proj):
            proj.bias.normal_()
    return attention


def _inputs(batch: int = 2, positions: int = 30, tokens: int = 7, v_dim: int = 16, l_dim: int = 12):
    generator = torch.Generator().manual_seed(1)
    v = torch.randn(batch, positions, v_dim, generator=generator)
    lang = torch.randn(batch, tokens, l_dim, generator=generator)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[1, 4:] = 0
    return v, lang, mask


def test_orders_agree_in_eval_with_padding():
    attention = _attention().eval()
    v, lang, mask = _inputs()
    with torch.no_grad():
        projected = attention.attend_projected(v, lang, mask)
        folded = attention.attend_folded(v, lang, mask)
    for a, b in zip(folded, projected, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert projected[0].abs().max() > 0.1


def test_orders_agree_in_gradients():
    attention = _attention().train().double()
    v, lang, mask = (t.double() if t.is_floating_point() else t for t in _inputs())
    grads = []
    for order in (attention.attend_projected, attention.attend_folded):
        attention.zero_grad()
        inputs = [v.clone().requires_grad_(), lang.clone().requires_grad_()]
        delta_v, delta_l = order(*inputs, mask)
        (delta_v.pow(2).sum() + delta_l.sin().sum()).backward()
        grads.append([t.grad for t in inputs] + [p.grad.clone() for p in attention.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # the softmaxes run in fp32


def test_folded_order_with_dropout_keeps_text_bias_weighting():
    """Under dropout an attention column no longer sums to one: the folded bias term follows it."""
    attention = _attention(dropout=0.5).train()
    v, lang, mask = _inputs()
    torch.manual_seed(3)
    folded = attention.attend_folded(v, lang, mask)
    assert all(torch.isfinite(t).all() for t in folded)
    with torch.no_grad():
        attention.values_v_proj.bias.zero_()
    torch.manual_seed(3)
    without_bias = attention.attend_folded(v, lang, mask)
    torch.testing.assert_close(folded[0], without_bias[0])
    assert not torch.allclose(folded[1], without_bias[1])


def test_orders_agree_under_bf16_autocast():
    attention = _attention().eval()
    v, lang, mask = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        projected = attention.attend_projected(v, lang, mask)
        folded = attention.attend_folded(v, lang, mask)
    for a, b in zip(folded, projected, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(("v_dim", "embed_dim", "heads", "tokens", "folded"), [
    (256, 2048, 8, 196, True),  # GLIP-T with the 80 COCO names
    (256, 2048, 8, 256, True),  # the official 256-token padding
    (256, 256, 8, 200, False),  # narrow heads: projecting the image side is cheaper
])
def test_cheaper_order_is_chosen(v_dim, embed_dim, heads, tokens, folded):
    attention = BiMultiHeadAttention(v_dim, 8, embed_dim, heads)
    assert attention.folded_is_cheaper(v_dim, tokens) is folded
