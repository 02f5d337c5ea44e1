"""Dense head, anchors, box coder and post-processing against the official GLIP golden vectors.

Cases head, post_processor and box_coder of tests/data/glip_golden_modules.pt (projects/GLIPv2/NUMERICS.md).
"""

import math

import pytest
import torch
import torchvision
from torch.testing import assert_close

from glipv2_d2.modeling.anchor_generator import LegacyAnchorGenerator, legacy_cell_anchors
from glipv2_d2.modeling.box_coder import LegacyBoxCoder
from glipv2_d2.modeling.dense_head import OFFICIAL_UNUSED_KEYS, GroundingPredictionHead
from glipv2_d2.modeling.postprocessing import (
    ATSSPostProcessor,
    Candidates,
    batch_label_token_matrices,
    legacy_batched_nms,
    token_logits_to_label_scores,
)

from .conftest import params_via_converter

TOL = {"rtol": 1e-4, "atol": 1e-4}


# ----------------------------------------------------------------------------------------------
# c. head


def _golden_head(case: dict) -> GroundingPredictionHead:
    config = case["config"]
    head = GroundingPredictionHead(in_channels=config["channels"], lang_dim=config["lang_dim"]).eval()
    params = params_via_converter(case["params"], "rpn.head.", "head.")
    assert set(case["params"]) - set(params) == set(OFFICIAL_UNUSED_KEYS)
    head.load_state_dict(params, strict=True)
    return head


def test_head_matches_official(golden):
    case = golden["head"]
    head = _golden_head(case)
    with torch.no_grad():
        out = head(case["inputs"]["visual"], case["inputs"]["lang_hidden"])
    expected = case["outputs"]
    assert_close(out["proj_tokens"], case["intermediates"]["dot_product_proj_tokens"], **TOL)
    assert_close(out["token_bias"], case["intermediates"]["dot_product_proj_tokens_bias"], **TOL)
    for key, golden_key in (
        ("logits", "dot_product_logits"),
        ("bbox_reg", "bbox_reg"),
        ("centerness", "centerness"),
    ):
        assert len(out[key]) == len(expected[golden_key])
        for ours, theirs in zip(out[key], expected[golden_key], strict=True):
            assert_close(ours, theirs, **TOL)


def test_head_official_init():
    head = GroundingPredictionHead()
    assert head.bias0.item() == pytest.approx(-math.log(99.0))
    assert head.log_scale.item() == 0.0
    assert torch.count_nonzero(head.bias_lang) == 0
    assert [s.scale.item() for s in head.scales] == [1.0] * 5
    for conv in (head.bbox_pred, head.centerness):
        assert torch.count_nonzero(conv.bias) == 0
        assert conv.weight.std().item() == pytest.approx(0.01, rel=0.5)
    assert not any(k.startswith("cls_logits") for k in head.state_dict())


def test_head_autocast_bf16(golden):
    case = golden["head"]
    head = _golden_head(case)
    with torch.no_grad():
        reference = head(case["inputs"]["visual"], case["inputs"]["lang_hidden"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = head(case["inputs"]["visual"], case["inputs"]["lang_hidden"])
    for ours, theirs in zip(low["logits"], reference["logits"], strict=True):
        assert torch.isfinite(ours).all()
        assert_close(ours.float(), theirs, rtol=0.05, atol=0.2)


# ----------------------------------------------------------------------------------------------
# anchors


def test_anchor_generator_matches_official(golden):
    case = golden["post_processor"]
    config = case["config"]["anchor_generator"]
    generator = LegacyAnchorGenerator(
        sizes=config["ANCHOR_SIZES"],
        strides=config["ANCHOR_STRIDE"],
        aspect_ratios=config["ASPECT_RATIOS"],
        scales_per_octave=config["SCALES_PER_OCTAVE"],
    )
    buffers = dict(generator.named_buffers())
    assert sorted(buffers) == [f"cell_anchors.{i}" for i in range(5)]
    assert all(b.shape == (1, 4) and b.dtype == torch.float32 for b in buffers.values())
    assert buffers["cell_anchors.0"].tolist() == [[-28.0, -28.0, 35.0, 35.0]]
    assert not generator.state_dict()  # recomputed from the config, never checkpointed

    anchors = generator.grid_anchors(case["inputs"]["level_sizes_hw"])
    for image_anchors in case["inputs"]["anchors"]:
        for ours, theirs in zip(anchors, image_anchors, strict=True):
            assert torch.equal(ours, theirs)
    features = [torch.zeros(1, 1, h, w) for h, w in case["inputs"]["level_sizes_hw"]]
    assert all(torch.equal(a, b) for a, b in zip(generator(features), anchors, strict=True))


def test_cell_anchors_several_ratios_and_scales():
    # The classic Faster R-CNN anchors (stride 16, sizes 128/256/512, ratios 0.5/1/2) of the legacy
    # generator the official code keeps; the listing in its comments is MATLAB's, 1-based, hence the -1.
    expected = (
        torch.tensor(
            [
                [-83, -39, 100, 56],
                [-175, -87, 192, 104],
                [-359, -183, 376, 200],
                [-55, -55, 72, 72],
                [-119, -119, 136, 136],
                [-247, -247, 264, 264],
                [-35, -79, 52, 96],
                [-79, -167, 96, 184],
                [-167, -343, 184, 360],
            ],
            dtype=torch.float32,
        )
        - 1
    )
    assert torch.equal(legacy_cell_anchors(16, (128, 256, 512), (0.5, 1.0, 2.0)), expected)

    generator = LegacyAnchorGenerator(
        sizes=(32, 64), strides=(8, 16), aspect_ratios=(0.5, 1.0, 2.0), scales_per_octave=3
    )
    assert generator.num_anchors_per_location == [9, 9]
    level0 = generator.grid_anchors([(2, 3), (1, 1)])[0]
    assert level0.shape == (2 * 3 * 9, 4)
    # location-major: anchors 9..17 are the cell at (y=0, x=1), i.e. shifted by one stride in x.
    assert torch.equal(level0[9:18], level0[:9] + torch.tensor([8.0, 0.0, 8.0, 0.0]))
    sides = level0[:9, 2] - level0[:9, 0] + 1
    assert sides[3:6].tolist() == pytest.approx([32.0, 32.0 * 2 ** (1 / 3), 32.0 * 2 ** (2 / 3)])


# ----------------------------------------------------------------------------------------------
# e. box coder


def test_box_coder_matches_official(golden):
    case = golden["box_coder"]
    inputs, expected = case["inputs"], case["outputs"]
    coder = LegacyBoxCoder(weights=case["config"]["weights_wx_wy_ww_wh"])
    assert coder.scale_clamp == pytest.approx(case["config"]["dw_dh_clamp_max"])
    encoded = coder.encode(inputs["gt_boxes"], inputs["anchors"])
    assert_close(encoded, expected["encode_gt_wrt_anchors"], **TOL)
    assert_close(coder.decode(inputs["preds"], inputs["anchors"]), expected["decode_preds"], **TOL)
    assert_close(coder.decode(inputs["preds_8col"], inputs["anchors"]), expected["decode_preds_8col"], **TOL)
    assert_close(coder.decode(encoded, inputs["anchors"]), expected["decode_of_encode"], **TOL)


def test_box_coder_batched_and_low_precision(golden):
    inputs = golden["box_coder"]["inputs"]
    coder = LegacyBoxCoder()
    flat = coder.decode(inputs["preds"], inputs["anchors"])
    batched = coder.decode(inputs["preds"][None].expand(3, -1, -1), inputs["anchors"])
    assert batched.shape == (3, 7, 4)
    assert_close(batched[2], flat)
    # Half-precision deltas are decoded in float32.
    assert coder.decode(inputs["preds"].half(), inputs["anchors"]).dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# d. post-processing


def _rows(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> list[tuple]:
    """Detections as rows sorted by (score desc, label, box), for order-free comparison."""
    rows = [(-s, int(lab), tuple(b)) for b, s, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist())]
    return sorted(rows)


def _assert_same_set(boxes, scores, labels, expected: dict) -> None:
    ours = _rows(boxes, scores, labels)
    theirs = _rows(expected["boxes_xyxy"], expected["scores"], expected["labels"])
    assert len(ours) == len(theirs)
    assert [r[1] for r in ours] == [r[1] for r in theirs]
    assert_close(torch.tensor([r[0] for r in ours]), torch.tensor([r[0] for r in theirs]), **TOL)
    assert_close(torch.tensor([r[2] for r in ours]), torch.tensor([r[2] for r in theirs]), **TOL)


def _assert_candidates(candidates: Candidates, label_ids: torch.Tensor, expected_per_image: list) -> None:
    labels = label_ids[candidates.image_index, candidates.label_index]
    for image, expected in enumerate(expected_per_image):
        mine = candidates.image_index == image
        _assert_same_set(candidates.boxes[mine], candidates.scores[mine], labels[mine], expected)


def _processor(config: dict) -> ATSSPostProcessor:
    assert config["MODEL.DYHEAD.SCORE_AGG"] == "MEAN"
    return ATSSPostProcessor(
        score_thresh=config["MODEL.ATSS.INFERENCE_TH"],
        pre_nms_top_n=config["MODEL.ATSS.PRE_NMS_TOP_N"],
        nms_thresh=config["MODEL.ATSS.NMS_TH"],
        detections_per_img=config["MODEL.ATSS.DETECTIONS_PER_IMG"],
        min_size=config["min_size"],
    )


def test_label_scores_match_official(golden):
    case = golden["post_processor"]
    inputs = case["inputs"]
    label_map = inputs["positive_map_label_to_token"]
    num_tokens = inputs["dot_product_logits"][0].shape[-1]
    label_ids, matrices, _ = batch_label_token_matrices([label_map] * 2, num_tokens)
    for logits, expected in zip(
        inputs["dot_product_logits"], case["intermediates"]["label_scores_per_level"], strict=True
    ):
        scores = token_logits_to_label_scores(logits, matrices)
        legacy = torch.zeros_like(expected)
        legacy[:, :, label_ids[0] - 1] = scores
        assert_close(legacy, expected, **TOL)


@pytest.mark.parametrize("config_name", ["released", "reduced"])
def test_post_processor_matches_official(golden, config_name):
    case = golden["post_processor"]
    inputs, expected = case["inputs"], case["outputs"][config_name]
    processor = _processor(case["config"][config_name])
    anchors = inputs["anchors"][0]
    assert all(torch.equal(a, b) for a, b in zip(anchors, inputs["anchors"][1], strict=True))
    label_maps = [inputs["positive_map_label_to_token"]] * 2
    image_sizes = [tuple(s) for s in inputs["image_sizes_hw"]]

    label_ids, matrices, valid = batch_label_token_matrices(
        label_maps, inputs["dot_product_logits"][0].shape[-1]
    )
    sizes = torch.tensor(image_sizes, dtype=torch.float32)
    per_level = []
    for level, (reg, ctr, logits, level_anchors) in enumerate(
        zip(
            inputs["box_regression"], inputs["centerness"], inputs["dot_product_logits"], anchors, strict=True
        )
    ):
        candidates = processor.select_level(reg, ctr, logits, level_anchors, sizes, matrices, valid)
        _assert_candidates(candidates, label_ids, expected["candidates_per_level"][level])
        per_level.append(candidates)
    nms_input = Candidates.cat(per_level)
    _assert_candidates(nms_input, label_ids, expected["nms_input"])
    nms_output = processor.nms(nms_input, label_ids.shape[1])
    _assert_candidates(nms_output, label_ids, expected["nms_output"])
    _assert_candidates(processor.cap(nms_output, 2), label_ids, expected["final"])

    results = processor(
        inputs["box_regression"],
        inputs["centerness"],
        inputs["dot_product_logits"],
        anchors,
        image_sizes,
        label_maps,
    )
    for image, (instances, theirs) in enumerate(zip(results, expected["final"], strict=True)):
        assert instances.image_size == image_sizes[image]
        assert instances.pred_classes.dtype == torch.int64
        assert torch.all(instances.scores[:-1] >= instances.scores[1:])
        _assert_same_set(instances.pred_boxes.tensor, instances.scores, instances.pred_classes, theirs)
    if config_name == "reduced":
        assert [len(r) for r in results] == [7, 6]  # the tie at the cap keeps 7 in image 0


def _head_outputs_for_image(inputs: dict, image: int) -> tuple:
    pick = slice(image, image + 1)
    return tuple([t[pick] for t in inputs[k]] for k in ("box_regression", "centerness", "dot_product_logits"))


def test_post_processor_per_image_label_maps_and_large_labels(golden):
    case = golden["post_processor"]
    inputs = case["inputs"]
    processor = _processor(case["config"]["reduced"])
    anchors = inputs["anchors"][0]
    image_sizes = [tuple(s) for s in inputs["image_sizes_hw"]]
    official = inputs["positive_map_label_to_token"]
    # Labels far above the legacy 80 columns, and a different prompt layout for image 1.
    maps = [{100 * k: v for k, v in official.items()}, {7: [3], 501: [9, 10], 90: [5, 5, 0]}]

    batched = processor(
        inputs["box_regression"],
        inputs["centerness"],
        inputs["dot_product_logits"],
        anchors,
        image_sizes,
        maps,
    )
    for image in range(2):
        reg, ctr, logits = _head_outputs_for_image(inputs, image)
        alone = processor(reg, ctr, logits, anchors, [image_sizes[image]], [maps[image]])[0]
        assert torch.equal(batched[image].pred_classes, alone.pred_classes)
        assert_close(batched[image].scores, alone.scores)
        assert_close(batched[image].pred_boxes.tensor, alone.pred_boxes.tensor)
        assert set(batched[image].pred_classes.tolist()) <= set(maps[image])

    official_result = processor(
        inputs["box_regression"],
        inputs["centerness"],
        inputs["dot_product_logits"],
        anchors,
        image_sizes,
        official,
    )[0]
    assert torch.equal(batched[0].pred_classes, official_result.pred_classes * 100)
    assert torch.equal(batched[0].scores, official_result.scores)


def test_post_processor_without_detections(golden):
    inputs = golden["post_processor"]["inputs"]
    processor = ATSSPostProcessor()
    image_sizes = [tuple(s) for s in inputs["image_sizes_hw"]]
    silent = [torch.full_like(t, -20.0) for t in inputs["dot_product_logits"]]
    for maps in ({1: [1]}, [{}, {}]):
        results = processor(
            inputs["box_regression"], inputs["centerness"], silent, inputs["anchors"][0], image_sizes, maps
        )
        assert [len(r) for r in results] == [0, 0]
        assert results[0].pred_boxes.tensor.shape == (0, 4)


def test_label_map_errors():
    processor = ATSSPostProcessor()
    reg, ctr = [torch.zeros(1, 4, 2, 2)], [torch.zeros(1, 1, 2, 2)]
    logits, anchors = [torch.zeros(1, 4, 6)], [torch.zeros(4, 4)]
    with pytest.raises(ValueError, match="label 3 has no tokens"):
        processor(reg, ctr, logits, anchors, [(16, 16)], {3: []})
    with pytest.raises(ValueError, match="outside the prompt's 6 tokens"):
        processor(reg, ctr, logits, anchors, [(16, 16)], {1: [2, 6]})


def _reference_legacy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> set[int]:
    """Greedy NMS written out with the "+1" areas of maskrcnn_benchmark's kernel."""
    order = scores.argsort(descending=True).tolist()
    kept: list[int] = []
    for i in order:
        overlaps = False
        for j in kept:
            lt = torch.maximum(boxes[i, :2], boxes[j, :2])
            rb = torch.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = (rb - lt + 1).clamp(min=0).prod()
            area_i = (boxes[i, 2:] - boxes[i, :2] + 1).prod()
            area_j = (boxes[j, 2:] - boxes[j, :2] + 1).prod()
            overlaps |= bool(inter / (area_i + area_j - inter) > iou_threshold)
        if not overlaps:
            kept.append(i)
    return set(kept)


def test_legacy_nms_equals_plus_one_reference():
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=generator) * 40
    wh = torch.rand(300, 2, generator=generator) * 12
    boxes = torch.cat((xy, xy + wh), dim=1)
    scores = torch.rand(300, generator=generator)
    groups = torch.randint(0, 3, (300,), generator=generator)
    keep = legacy_batched_nms(boxes, scores, groups, 0.5)
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])
    expected = set()
    for g in range(3):
        members = (groups == g).nonzero().flatten()
        expected |= {members[i].item() for i in _reference_legacy_nms(boxes[members], scores[members], 0.5)}
    assert set(keep.tolist()) == expected
    # Small boxes are where "+1" matters: plain IoU would keep a different set.
    assert set(torchvision.ops.batched_nms(boxes, scores, groups, 0.5).tolist()) != expected
