"""ATSS assignment and GLIP training losses: the official golden case plus hand-worked cases."""

import math

import pytest
import torch

from glipv2_d2.modeling.atss_assigner import atss_assign
from glipv2_d2.modeling.box_coder import LegacyBoxCoder
from glipv2_d2.modeling.losses import (
    GroundingATSSLoss,
    centerness_targets,
    giou_loss,
    token_sigmoid_focal_loss,
)

# Toy anchors ("+1" convention: [0, 0, 9, 9] is 10 x 10 with centre (4.5, 4.5)).
LEVEL0 = torch.tensor([[0, 0, 9, 9], [10, 0, 19, 9], [20, 0, 29, 9], [30, 0, 39, 9]], dtype=torch.float32)
LEVEL1 = torch.tensor([[0, 0, 19, 19], [20, 0, 39, 19]], dtype=torch.float32)


def _loss() -> GroundingATSSLoss:
    return GroundingATSSLoss(LegacyBoxCoder())


def _golden_inputs(case: dict) -> dict:
    inputs = case["inputs"]
    counts = [len(b) for b in inputs["gt_boxes_xyxy"]]
    return {
        "anchors": inputs["anchors"][0],
        "gt_boxes": inputs["gt_boxes_xyxy"],
        "positive_maps": list(inputs["positive_map"].split(counts)),
        "logits": inputs["dot_product_logits"],
        "bbox_reg": inputs["box_regression"],
        "centerness": inputs["centerness"],
        "text_mask": inputs["text_masks"],
    }


def _assert_losses_close(actual: dict, expected: dict) -> None:
    assert set(actual) == {"loss_dot_product_token", "loss_reg", "loss_centerness"}
    for name, value in actual.items():
        assert value.dtype == torch.float32 and value.dim() == 0, name
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=0, msg=name)


# ---------------------------------------------------------------- golden case f


def test_golden_assignment_and_targets(golden):
    case = golden["atss_loss"]
    x, out = _golden_inputs(case), case["outputs"]
    targets = _loss().prepare_targets(x["anchors"], x["gt_boxes"], x["positive_maps"], num_tokens=256)

    for matched, gt_labels, expected in zip(targets.matched_idxs, case["inputs"]["gt_labels"], out["matched_labels"]):
        labels = torch.where(matched >= 0, gt_labels[matched.clamp(min=0)], torch.zeros_like(matched))
        assert torch.equal(labels, expected)
    assert torch.equal(targets.positive_indices, out["positive_anchor_indices"])
    assert list(targets.token_labels.shape) == out["token_labels_shape"]
    assert torch.equal(targets.token_labels.nonzero(), out["token_labels_nonzero"])
    torch.testing.assert_close(targets.reg_targets, out["reg_targets_positive"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets.centerness_targets, out["centerness_targets_positive"], rtol=1e-5, atol=1e-6)


def test_golden_losses(golden):
    case = golden["atss_loss"]
    out = case["outputs"]
    losses = _loss()(**_golden_inputs(case))
    _assert_losses_close(losses, out["losses_dict"])
    torch.testing.assert_close(losses["loss_reg"], out["reg_loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["loss_centerness"], out["centerness_loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["loss_dot_product_token"], out["dot_product_token_loss"], rtol=1e-5, atol=0)


def test_golden_losses_under_bf16_autocast(golden):
    """Losses are computed in float32 whatever the autocast state; bf16 inputs only round them."""
    case = golden["atss_loss"]
    x = _golden_inputs(case)
    for key in ("logits", "bbox_reg", "centerness"):
        x[key] = [t.bfloat16() for t in x[key]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _loss()(**x)
    for name, value in losses.items():
        assert value.dtype == torch.float32, name
        torch.testing.assert_close(value, case["outputs"]["losses_dict"][name], rtol=2e-2, atol=0)


def test_dynamic_padding_matches_padding_to_max_len(golden):
    """Without the token-255 column (T < max_query_len) the loss equals the padded one when the
    extra columns are masked: the "no object" slot only counts under the text mask."""
    case = golden["atss_loss"]
    x = _golden_inputs(case)
    x["text_mask"] = torch.zeros(2, 256, dtype=torch.long)
    x["text_mask"][:, :10] = 1
    padded = _loss()(**x)
    short = dict(
        x,
        positive_maps=[m[:, :10] for m in x["positive_maps"]],
        logits=[t[..., :10] for t in x["logits"]],
        text_mask=x["text_mask"][:, :10],
    )
    truncated = _loss()(**short)
    targets = _loss().prepare_targets(short["anchors"], short["gt_boxes"], short["positive_maps"], 10)
    negatives = targets.matched_idxs < 0
    assert not targets.token_labels[negatives].any()
    for name in padded:
        torch.testing.assert_close(truncated[name], padded[name], rtol=1e-6, atol=0, msg=name)


# ---------------------------------------------------------------- ATSS by hand


def test_atss_single_gt():
    # GT [2, 2, 11, 11] (centre (6.5, 6.5)), topk=3. Candidates: level 0 the 3 nearest centres
    # A0 (d=2.8), A1 (8.2), A2 (18.1); level 1 k=min(3, 2)=2: B0, B1.
    # "+1" IoUs: A0 64/136=0.471, A1 16/184=0.087, A2 0, B0 100/400=0.25, B1 0.
    # mean 0.1615 + unbiased std 0.2007 = threshold 0.362 -> only A0; its centre (4.5, 4.5) is
    # inside the GT by 2.5 px. Positive: A0 only.
    matched, iou = atss_assign([LEVEL0, LEVEL1], torch.tensor([[2.0, 2.0, 11.0, 11.0]]), topk=3)
    assert matched.tolist() == [0, -1, -1, -1, -1, -1]
    torch.testing.assert_close(iou, torch.tensor([64 / 136, 0, 0, 0, 0, 0]))


def test_atss_threshold_uses_unbiased_std():
    # GT [0, 0, 15, 11] (16 x 12 = 192 px, centre (7.5, 5.5)), topk=3. Candidates A0, A1, A2, B0, B1
    # with IoUs 100/192=0.521, 60/232=0.259, 0, 192/400=0.480, 0: mean 0.252, unbiased std 0.251
    # -> threshold 0.5025, so B0 (centre inside) stays negative; the biased std (0.224, threshold
    # 0.476) would wrongly make it positive.
    matched, _ = atss_assign([LEVEL0, LEVEL1], torch.tensor([[0.0, 0.0, 15.0, 11.0]]), topk=3)
    assert matched.tolist() == [0, -1, -1, -1, -1, -1]


def test_atss_anchor_positive_for_two_gts_takes_highest_iou():
    # GT 1 = [0, 0, 9, 12] (130 px, centre (4.5, 6)): candidates A0, A1, A2, B0, B1 with IoUs
    # 100/130=0.769, 0, 0, 130/400=0.325, 0 -> threshold 0.219 + 0.338 = 0.557 -> A0 positive.
    # A0 is positive for GT 0 too (previous test) with IoU 0.471 < 0.769, so it goes to GT 1.
    gt = torch.tensor([[2.0, 2.0, 11.0, 11.0], [0.0, 0.0, 9.0, 12.0]])
    matched, iou = atss_assign([LEVEL0, LEVEL1], gt, topk=3)
    assert matched.tolist() == [1, -1, -1, -1, -1, -1]
    torch.testing.assert_close(iou[0], torch.tensor(100 / 130))


def test_atss_centre_must_lie_inside_gt():
    # GT [5, 0, 9, 9]: A0 has IoU 50/100=0.5 above the threshold 0.125 + 0.217 = 0.342, but its
    # centre x=4.5 lies 0.5 px left of the GT -> no positive at all.
    matched, _ = atss_assign([LEVEL0, LEVEL1], torch.tensor([[5.0, 0.0, 9.0, 9.0]]), topk=3)
    assert (matched == -1).all()


def test_atss_no_gt_and_degenerate_gt():
    matched, iou = atss_assign([LEVEL0, LEVEL1], torch.zeros(0, 4))
    assert matched.tolist() == [-1] * 6 and not iou.any()
    degenerate = torch.tensor([[5.0, 5.0, 3.0, 3.0], [4.0, 4.0, 4.0, 4.0], [2.0, 2.0, 11.0, 11.0]])
    matched, iou = atss_assign([LEVEL0, LEVEL1], degenerate, topk=3)
    assert torch.isfinite(iou).all()
    assert matched.tolist() == [2, -1, -1, -1, -1, -1]


# ---------------------------------------------------------------- loss functions by hand


def _hand_focal(logit: float, target: int, alpha: float = 0.25, gamma: float = 2.0) -> float:
    p = 1 / (1 + math.exp(-logit))
    if target:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p**gamma * math.log(1 - p)


def test_token_focal_loss_against_hand_formula():
    logits = torch.tensor([[[0.0, 1.5, -2.0], [0.7, -0.3, 9.0]]])
    targets = torch.tensor([[[1, 0, 1], [0, 1, 1]]], dtype=torch.bool)
    text_mask = torch.tensor([[1, 1, 0]])  # the third token is padding and must not count
    expected = sum(_hand_focal(logits[0, a, t].item(), int(targets[0, a, t])) for a in range(2) for t in range(2))
    actual = token_sigmoid_focal_loss(logits, targets, text_mask)
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-6, atol=0)
    # At logit 0 (p = 1/2): a positive costs 0.25 * 0.25 * ln 2, a negative 0.75 * 0.25 * ln 2.
    zero = token_sigmoid_focal_loss(torch.zeros(1, 2, 3), targets, text_mask)
    torch.testing.assert_close(zero, torch.tensor(0.5 * math.log(2)))


def test_giou_loss_known_values():
    box = torch.tensor([[1.0, 2.0, 5.0, 7.0]])
    assert giou_loss(box, box).item() == pytest.approx(0.0, abs=1e-6)
    # Disjoint unit boxes one apart: IoU 0, enclosing 3, union 2 -> GIoU -1/3, loss 4/3.
    disjoint = giou_loss(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 3.0, 1.0]]))
    assert disjoint.item() == pytest.approx(4 / 3, rel=1e-6)
    # An inverted prediction is raised to zero width at x1 (official): IoU 0 and the enclosing box
    # equals the target, so GIoU 0, loss 1 (not the value of a negative-area box).
    inverted = giou_loss(torch.tensor([[5.0, 5.0, 3.0, 7.0]]), torch.tensor([[4.0, 4.0, 6.0, 8.0]]))
    assert inverted.item() == pytest.approx(1.0, rel=1e-6)


def test_giou_loss_weights_and_zero_weight_fallback():
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 2.0, 5.0, 7.0]])
    target = torch.tensor([[2.0, 0.0, 3.0, 1.0], [1.0, 2.0, 5.0, 7.0]])
    weighted = giou_loss(pred, target, torch.tensor([0.5, 2.0]))
    assert weighted.item() == pytest.approx(0.5 * 4 / 3, rel=1e-5)
    assert giou_loss(pred, target, torch.zeros(2)).item() == pytest.approx(4 / 3, rel=1e-5)


def test_centerness_targets_known_values():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]])  # centres (5, 5), (2, 2)
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 1.0, 8.0, 4.0]])
    # Second: l=2, r=6, t=1, b=2 -> sqrt(2/6 * 1/2).
    expected = torch.tensor([1.0, math.sqrt(1 / 6)])
    torch.testing.assert_close(centerness_targets(anchors, gts), expected)


# ---------------------------------------------------------------- the loss class


def _random_predictions(batch: int, level_sizes: list[tuple[int, int]], num_tokens: int) -> dict:
    return {
        "logits": [torch.randn(batch, h * w, num_tokens, requires_grad=True) for h, w in level_sizes],
        "bbox_reg": [(0.1 * torch.randn(batch, 4, h, w)).requires_grad_() for h, w in level_sizes],
        "centerness": [torch.randn(batch, 1, h, w, requires_grad=True) for h, w in level_sizes],
    }


def _grid_anchors(level_sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    from glipv2_d2.modeling.anchor_generator import LegacyAnchorGenerator

    return LegacyAnchorGenerator().grid_anchors(level_sizes)


LEVEL_SIZES = [(8, 10), (4, 5), (2, 3), (1, 2), (1, 1)]


def test_image_without_gt_gives_only_negatives_and_finite_losses():
    anchors = _grid_anchors(LEVEL_SIZES)
    gt_boxes = [torch.tensor([[10.0, 12.0, 40.0, 50.0]]), torch.zeros(0, 4)]
    positive_maps = [torch.zeros(1, 256), torch.zeros(0, 256)]
    positive_maps[0][0, 1:3] = 1
    text_mask = torch.zeros(2, 256, dtype=torch.long)
    text_mask[:, :5] = 1
    preds = _random_predictions(2, LEVEL_SIZES, 256)
    loss = _loss()
    targets = loss.prepare_targets(anchors, gt_boxes, positive_maps, 256)
    assert (targets.matched_idxs[1] == -1).all() and (targets.matched_idxs[0] >= 0).any()
    # Every negative anchor of the GT-less image carries only the "no object" token 255.
    assert torch.equal(targets.token_labels[1].nonzero()[:, 1], torch.full((109,), 255))
    losses = loss(anchors, gt_boxes, positive_maps, text_mask=text_mask, **preds)
    assert all(torch.isfinite(v) for v in losses.values())

    nothing = loss(anchors, [torch.zeros(0, 4)] * 2, [torch.zeros(0, 256)] * 2, text_mask=text_mask, **preds)
    assert nothing["loss_reg"].item() == 0 and nothing["loss_centerness"].item() == 0
    expected_token = token_sigmoid_focal_loss(
        torch.cat(preds["logits"], dim=1), torch.zeros(2, 109, 256), text_mask
    )  # N_pos floors at 1; token 255 is masked here
    torch.testing.assert_close(nothing["loss_dot_product_token"], expected_token)
    sum(nothing.values()).backward()  # still differentiable without positives


def test_gradients_reach_all_predictions():
    anchors = _grid_anchors(LEVEL_SIZES)
    gt_boxes = [torch.tensor([[10.0, 12.0, 40.0, 50.0], [30.0, 5.0, 70.0, 35.0]])]
    positive_maps = [torch.zeros(2, 16)]
    positive_maps[0][0, 1] = positive_maps[0][1, 3] = 1
    preds = _random_predictions(1, LEVEL_SIZES, 16)
    losses = _loss()(anchors, gt_boxes, positive_maps, text_mask=torch.ones(1, 16), **preds)
    sum(losses.values()).backward()
    for key in ("logits", "bbox_reg", "centerness"):
        grads = torch.cat([t.grad.flatten() for t in preds[key]])
        assert torch.isfinite(grads).all() and grads.abs().sum() > 0, key


def test_positive_map_width_must_match_logits():
    anchors = _grid_anchors(LEVEL_SIZES)
    with pytest.raises(ValueError, match=r"positive_maps\[0\]"):
        _loss().prepare_targets(anchors, [torch.tensor([[10.0, 12.0, 40.0, 50.0]])], [torch.zeros(1, 8)], 16)


def test_batch_size_mismatch_is_refused():
    anchors = _grid_anchors(LEVEL_SIZES)
    preds = _random_predictions(2, LEVEL_SIZES, 16)
    with pytest.raises(ValueError, match="batch of 2 predictions but 1 gt_boxes"):
        _loss()(anchors, [torch.zeros(0, 4)], [torch.zeros(0, 16)], text_mask=torch.ones(2, 16), **preds)
