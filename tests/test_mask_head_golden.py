"""The mask head reproduces official GLIP's dormant mask head (tests/data/glip_golden_mask_head.pt,
described in projects/GLIPv2/NUMERICS.md), loaded through the official parameter names."""

import logging

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.structures import PolygonMasks

from glipv2_d2 import add_glipv2_config
from glipv2_d2.modeling.mask_head import MaskHead
from glipv2_d2.modeling.mask_head.loss import build_mask_targets, legacy_pairwise_iou
from glipv2_d2.modeling.mask_head.paste import legacy_paste_boxes, paste_masks
from glipv2_d2.modeling.mask_head.pooler import assign_legacy_levels, boxes_to_rois
from glipv2_d2.modeling.mask_head.tokens import label_token_weights, mean_token_logits

from .conftest import DATA_DIR, params_via_converter, recorded_calls

HEAD_PREFIX = "task_heads.MaskHead."
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def golden_mask() -> dict:
    return torch.load(DATA_DIR / "glip_golden_mask_head.pt", weights_only=True)


@pytest.fixture(scope="module")
def head(golden_mask, single_thread) -> MaskHead:
    """GLIPv2-T's head (one hourglass block) with the golden parameters, renamed by the converter."""
    cfg = add_glipv2_config(get_cfg())
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_MASK_HEAD.CONV_LAYERS = [256]
    levels = [ShapeSpec(channels=256, stride=stride) for stride in (8, 16, 32, 64, 128)]
    head = MaskHead(cfg, levels, text_dim=768).eval()
    params = params_via_converter(golden_mask["mask_loss"]["params"], "roi_heads.mask.", HEAD_PREFIX)
    head.load_state_dict({k: v.contiguous() for k, v in params.items()}, strict=True)
    return head


def _features(case: dict) -> list[torch.Tensor]:
    return [level.contiguous() for level in case["inputs"]["features"]]


def _boxes(box_sets: list[dict]) -> list[torch.Tensor]:
    return [box_set["boxes_xyxy"] for box_set in box_sets]


def test_the_converter_maps_every_golden_parameter_onto_the_head(golden_mask, head):
    for case, prefix in (("mask_feature_extractor", "feature_extractor."), ("mask_predictor", "predictor.")):
        params = params_via_converter(golden_mask[case]["params"], f"roi_heads.mask.{prefix}", HEAD_PREFIX + prefix)
        state = getattr(head, prefix[:-1]).state_dict()
        assert set(params) == set(state)
        for key, value in params.items():
            assert torch.equal(state[key], value), key


def test_feature_extractor_levels_pooling_and_hourglass(golden_mask, head):
    case = golden_mask["mask_feature_extractor"]
    expected = case["intermediates"]
    boxes = _boxes(case["inputs"]["boxes"])
    rois = boxes_to_rois(boxes)
    assert torch.equal(rois, expected["rois"])
    widths, heights = rois[:, 3] - rois[:, 1] + 1, rois[:, 4] - rois[:, 2] + 1
    torch.testing.assert_close(torch.sqrt(widths * heights), expected["box_sqrt_area_plus1"], **TOLERANCE)
    assert torch.equal(assign_legacy_levels(rois[:, 1:], 3, 7), expected["levels"])
    table = expected["level_mapper_table"]
    assert torch.equal(assign_legacy_levels(table["boxes_xyxy"], 3, 7), table["levels"])
    assert not torch.equal(table["levels"], table["levels_if_area_without_plus1"])  # the +1 matters here

    with torch.no_grad(), recorded_calls({"pooler": head.feature_extractor.pooler}) as calls:
        output = head.feature_extractor(_features(case), boxes)
    assert torch.equal(calls["pooler"][0].output, expected["pooled"])
    torch.testing.assert_close(output, case["outputs"]["features"], **TOLERANCE)


def test_predictor_matches_pixels_with_normalised_words(golden_mask, head):
    case = golden_mask["mask_predictor"]
    text = case["inputs"]["language_hidden"]
    x = case["inputs"]["x"]
    with torch.no_grad():
        tokens, token_bias = head.predictor.project_tokens(text)
        logits = head.predictor(x, text, torch.zeros(len(x), dtype=torch.long))
    torch.testing.assert_close(tokens, case["intermediates"]["dot_product_proj_tokens"], **TOLERANCE)
    torch.testing.assert_close(token_bias, case["intermediates"]["dot_product_proj_tokens_bias"], **TOLERANCE)
    torch.testing.assert_close(logits, case["outputs"]["mask_logits"], **TOLERANCE)


def test_inference_takes_the_mean_logit_of_the_label_tokens_and_pastes_as_glip(golden_mask, caplog):
    case = golden_mask["mask_inference"]
    label_map = case["inputs"]["positive_map_label_to_token"]
    logits = case["inputs"]["mask_logits"].split([len(d["labels"]) for d in case["inputs"]["detections"]])
    probs = []
    with caplog.at_level(logging.WARNING):
        for image_logits, detections, expected in zip(
            logits, case["inputs"]["detections"], case["outputs"]["mask_prob"]
        ):
            weights = label_token_weights(detections["labels"], label_map, image_logits.shape[1])
            mean = mean_token_logits(image_logits, weights)
            probs.append(mean.sigmoid()[:, None])
            torch.testing.assert_close(probs[-1], expected, **TOLERANCE)
    assert "label 4 is not in the prompt's label->token map" in caplog.text
    torch.testing.assert_close(
        torch.cat([mean_token_logits(lg, label_token_weights(d["labels"], label_map, 16))
                   for lg, d in zip(logits, case["inputs"]["detections"])]),
        case["intermediates"]["mean_logit_of_label_tokens"], **TOLERANCE,
    )
    assert torch.equal(probs[1][1], torch.full((1, 28, 28), 0.5))  # the missing label

    paste = case["inputs"]["paste_detections"][0]
    width, height = paste["image_size_wh"]
    assert torch.equal(legacy_paste_boxes(paste["boxes_xyxy"], 28), case["intermediates"]["paste_int_boxes_xyxy"])
    pasted = paste_masks(torch.cat(probs), paste["boxes_xyxy"], height, width, threshold=0.5)
    assert pasted.dtype == torch.bool
    assert torch.equal(pasted, case["outputs"]["pasted_masks"][:, 0])
    assert pasted.flatten(1).sum(1).tolist() == [255, 27, 619, 93, 0]


def _loss_inputs(case: dict, proposals: dict) -> dict:
    targets = case["inputs"]["targets"][0]
    polygons = [[p.double().numpy() for p in instance] for instance in targets["polygons"]]
    return {
        "proposals": proposals["boxes_xyxy"][proposals["labels"] > 0],
        "gt_boxes": targets["boxes_xyxy"],
        "gt_masks": PolygonMasks(polygons),
        "positive_map": targets["positive_map"],
    }


def test_loss_matching_targets_and_value(golden_mask, head):
    case = golden_mask["mask_loss"]
    expected = case["intermediates"]
    proposals = case["inputs"]["proposals"][0]
    assert torch.equal(proposals["labels"] > 0, expected["kept_proposal_mask"])
    given = _loss_inputs(case, proposals)
    torch.testing.assert_close(legacy_pairwise_iou(given["gt_boxes"], given["proposals"]), expected["iou_gt_x_kept"])
    targets = build_mask_targets(
        given["proposals"], given["gt_boxes"], given["gt_masks"], given["positive_map"], head.matcher, 28
    )
    assert torch.equal(targets.matched_idxs, expected["matched_idxs"])
    assert torch.equal(targets.token_counts, expected["labels_token_count"])
    assert torch.equal(targets.positive_inds, expected["positive_inds"])
    assert torch.equal(targets.targets, expected["mask_targets"])

    features = _features(case)
    text = case["inputs"]["language_hidden"]
    positives = given["proposals"][targets.positive_inds]
    with torch.no_grad():
        box_features = head.feature_extractor(features, [positives])
        token_logits = head.predictor(box_features, text, torch.zeros(3, dtype=torch.long))
        mean = head.mask_logits(features, [positives], text, targets.token_weights)
    torch.testing.assert_close(token_logits, expected["mask_logits_positive"], **TOLERANCE)
    torch.testing.assert_close(mean, expected["mask_logits_positive_mean_over_tokens"], **TOLERANCE)

    head.train()
    try:
        loss = head.mask_loss(features, [given["proposals"]], text, [given["gt_boxes"]], [given["gt_masks"]],
                              [given["positive_map"]])
        torch.testing.assert_close(loss, case["outputs"]["loss_mask"], rtol=1e-5, atol=0)
        no_positive = _loss_inputs(case, case["no_positive"]["inputs"]["proposals"][0])
        zero = head.mask_loss(features, [no_positive["proposals"]], text, [no_positive["gt_boxes"]],
                              [no_positive["gt_masks"]], [no_positive["positive_map"]])
    finally:
        head.eval()
    assert zero.item() == case["no_positive"]["outputs"]["loss_mask"].item() == 0.0
    assert zero.requires_grad


def test_end_to_end_head_and_zero_detections(golden_mask, head):
    case = golden_mask["mask_head_end_to_end"]
    inputs = case["inputs"]
    features = _features(case)
    detections = inputs["detections"][0]
    label_map = inputs["positive_map_label_to_token"]
    with torch.no_grad():
        probs = head.predict_mask_probs(features, [detections["boxes_xyxy"]], [detections["labels"]],
                                        inputs["language_hidden"], inputs["language_masks"], [label_map])
        empty = case["empty"]["inputs"]["detections"][0]
        nothing = head.predict_mask_probs(features, [empty["boxes_xyxy"]], [empty["labels"]],
                                          inputs["language_hidden"], inputs["language_masks"], [label_map])
    assert case["outputs"]["losses"] == {}
    torch.testing.assert_close(probs[0], case["outputs"]["mask_prob"][0], **TOLERANCE)
    assert case["empty"]["outputs"] is None  # the official head crashes here
    assert nothing[0].shape == (0, 1, 28, 28)
