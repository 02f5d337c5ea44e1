"""The language-guided mask head on hand-built cases, and inside a tiny GLIPv2 (MASK_ON)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from PIL import Image, ImageDraw

from glipv2_d2 import add_glipv2_config
from glipv2_d2.data.prompts import build_labeled_prompt, encode_prompt, token_map_to_positive_map
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.modeling.mask_head import MaskHead
from glipv2_d2.modeling.mask_head.loss import build_mask_targets, crop_mask_targets
from glipv2_d2.modeling.mask_head.paste import paste_masks
from glipv2_d2.modeling.mask_head.predictor import LOGIT_CLAMP, VisionLanguageMaskPredictor
from glipv2_d2.modeling.mask_head.tokens import label_token_weights, mean_token_logits

from .tiny_model import tiny_cfg

STRIDES = (8, 16, 32, 64, 128)


def _head_cfg(channels: int = 8):
    cfg = add_glipv2_config(get_cfg())
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_MASK_HEAD.CONV_LAYERS = [channels]
    return cfg


def _small_head(channels: int = 8, text_dim: int = 6) -> MaskHead:
    levels = [ShapeSpec(channels=channels, stride=s) for s in STRIDES]
    return MaskHead(_head_cfg(channels), levels, text_dim).eval()


def _pyramid(batch: int, channels: int = 8, size: int = 256) -> list[torch.Tensor]:
    return [torch.randn(batch, channels, math.ceil(size / s), math.ceil(size / s)) for s in STRIDES]


# --- hand-built cases ----------------------------------------------------------------------------


def _hand_built_predictor() -> VisionLanguageMaskPredictor:
    """2 pixel channels, 3-d words: the deconvolution copies each channel to its 2x2 block, the
    projection keeps word dims 0 and 2, the logit scale divides by 2, the language bias reads dim 0."""
    predictor = VisionLanguageMaskPredictor(in_channels=2, text_dim=3)
    with torch.no_grad():
        predictor.conv5_mask.weight.copy_(torch.eye(2)[:, :, None, None].expand(2, 2, 2, 2))
        predictor.conv5_mask.bias.zero_()
        predictor.dot_product_projection_text.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
        predictor.dot_product_projection_text.bias.zero_()
        predictor.log_scale.fill_(math.log(2.0))
        predictor.bias_lang.copy_(torch.tensor([1.0, 0, 0]))
    return predictor


def test_matching_predictor_on_a_hand_built_case():
    predictor = _hand_built_predictor()
    # Words [3, 0, 4] -> unit [0.6, 0, 0.8] -> projected [0.3, 0.4], bias 0.6; [0, 5, 0] -> [0, 0], bias 0.
    text = torch.tensor([[[3.0, 0, 4], [0, 5, 0]]])
    boxes = torch.tensor([[2.0, 1.0], [-1.0, 3.0]])[:, :, None, None]  # one pixel each, ReLU'd after upsampling
    with torch.no_grad():
        logits = predictor(boxes, text, torch.tensor([0, 0]))
    assert logits.shape == (2, 2, 2, 2)
    # Box 0: (2 * 0.3 + 1 * 0.4) / 2 + 0.6 = 1.1; box 1: (0 * 0.3 + 3 * 0.4) / 2 + 0.6 = 1.2; token 1: 0.
    torch.testing.assert_close(logits[:, 0], torch.tensor([1.1, 1.2])[:, None, None].expand(2, 2, 2))
    torch.testing.assert_close(logits[:, 1], torch.zeros(2, 2, 2))
    # A label over both tokens reads the mean LOGIT: 0.55 and 0.6.
    weights = label_token_weights(torch.tensor([7, 7]), {7: [0, 1]}, num_tokens=2)
    expected_mean = torch.tensor([0.55, 0.6])[:, None, None].expand(2, 2, 2)
    torch.testing.assert_close(mean_token_logits(logits, weights), expected_mean)
    with torch.no_grad():
        predictor.log_scale.fill_(-30.0)
        clamped = predictor(boxes, text, torch.tensor([0, 0]))
    assert clamped[:, 0].eq(LOGIT_CLAMP).all()


def _left_half_polygon() -> list[np.ndarray]:
    return [np.array([0.0, 0.0, 28.0, 0.0, 28.0, 56.0, 0.0, 56.0])]


def test_polygon_and_bitmask_targets_of_a_known_mask():
    box = torch.tensor([[0.0, 0.0, 56.0, 56.0]])
    expected = torch.zeros(1, 28, 28)
    expected[:, :, :14] = 1.0
    assert torch.equal(crop_mask_targets(PolygonMasks([_left_half_polygon()]), box, 28), expected)
    bitmask = torch.zeros(1, 64, 64, dtype=torch.bool)
    bitmask[:, :56, :28] = True
    assert torch.equal(crop_mask_targets(BitMasks(bitmask), box, 28), expected)
    with pytest.raises(TypeError, match="PolygonMasks or BitMasks"):
        crop_mask_targets([_left_half_polygon()], box, 28)


def test_loss_on_a_known_target():
    """Pixel features zeroed, the language bias reads word dim 0: every logit is 1 for word e_0 and
    0 for e_1, so the loss on a half-foreground target is 0.5 softplus(-z) + 0.5 softplus(z)."""
    head = _small_head()
    with torch.no_grad():
        head.predictor.conv5_mask.weight.zero_()
        head.predictor.conv5_mask.bias.zero_()
        head.predictor.bias_lang.copy_(torch.eye(6)[0])
    text = torch.eye(6)[None, :3]  # tokens 0 (logit 1), 1 (logit 0), 2 (padding-like, never positive)
    gt_boxes = torch.tensor([[0.0, 0.0, 56.0, 56.0], [100.0, 100.0, 150.0, 150.0]])
    masks = PolygonMasks([_left_half_polygon(), [np.array([100.0, 100, 150, 100, 150, 150])]])
    proposals = torch.tensor([[0.0, 0.0, 56.0, 56.0], [101.0, 100.0, 150.0, 151.0], [200.0, 200.0, 250.0, 250.0]])

    def loss_for(phrase_tokens: list[list[int]]) -> torch.Tensor:
        positive_map = torch.zeros(2, 3)
        for row, tokens in enumerate(phrase_tokens):
            positive_map[row, tokens] = 1.0
        return head.mask_loss(_pyramid(1), [proposals], text, [gt_boxes], [masks], [positive_map])

    half = 0.5 * (F.softplus(torch.tensor(-1.0)) + F.softplus(torch.tensor(1.0)))
    torch.testing.assert_close(loss_for([[0], []]), half)  # GT 1's empty phrase gives no loss
    mean = 0.5  # tokens {0, 1}: mean logit 0.5
    torch.testing.assert_close(
        loss_for([[0, 1], []]), 0.5 * (F.softplus(torch.tensor(-mean)) + F.softplus(torch.tensor(mean)))
    )
    assert loss_for([[], []]).item() == 0.0
    targets = build_mask_targets(proposals, gt_boxes, masks, torch.tensor([[1.0, 0, 0], [0, 1, 0]]), head.matcher, 28)
    assert targets.matched_idxs.tolist() == [0, 1, -1] and targets.positive_inds.tolist() == [0, 1]


def _paste_all_ones(boxes: list[list[float]], height: int, width: int) -> torch.Tensor:
    return paste_masks(torch.ones(len(boxes), 1, 28, 28), torch.tensor(boxes), height, width)


def test_pasting_at_borders_and_for_boxes_partly_outside():
    # 28-pixel boxes scale to 30 exactly, so shifting a box shifts its pasted mask pixel for pixel.
    boxes = [[-10.0, -6.0, 18.0, 22.0], [30.0, 20.0, 58.0, 48.0], [-20.0, 25.0, 8.0, 53.0]]
    inside = _paste_all_ones(boxes, 40, 48)
    shifted = [[x1 + 50, y1 + 50, x2 + 50, y2 + 50] for x1, y1, x2, y2 in boxes]
    on_a_larger_canvas = _paste_all_ones(shifted, 140, 148)[:, 50:90, 50:98]
    assert torch.equal(inside, on_a_larger_canvas)
    assert inside.shape == (3, 40, 48) and all(m.any() for m in inside)
    assert inside[0, 0, 0] and inside[1, -1, -1]  # clipped at the top-left and bottom-right corners
    outside = _paste_all_ones([[60.0, 5.0, 80.0, 20.0], [-50.0, -50.0, -20.0, -10.0]], 40, 48)
    assert outside.shape == (2, 40, 48) and not outside.any()
    half = paste_masks(torch.full((1, 1, 28, 28), 0.5), torch.tensor([[5.0, 5.0, 30.0, 30.0]]), 40, 48)
    assert not half.any()  # strictly above the threshold


def test_a_phrase_matching_no_box_leaves_the_other_masks_unchanged():
    head = _small_head()
    features, text = _pyramid(1), torch.randn(1, 9, 6)
    boxes, labels = [torch.tensor([[10.0, 20.0, 90.0, 100.0], [50.0, 5.0, 200.0, 60.0]])], [torch.tensor([0, 2])]
    mask = torch.ones(1, 9, dtype=torch.long)
    with torch.no_grad():
        two = head.predict_mask_probs(features, boxes, labels, text, mask, [{0: [1, 2], 2: [5]}])
        three = head.predict_mask_probs(features, boxes, labels, text, mask, [{0: [1, 2], 1: [3, 4], 2: [5]}])
        none = head.predict_mask_probs(features, [boxes[0][:0]], [labels[0][:0]], text, mask, [{0: [1, 2]}])
    assert torch.equal(two[0], three[0]) and two[0].shape == (2, 1, 28, 28)
    assert none[0].shape == (0, 1, 28, 28)


def test_multi_image_batch_with_different_prompts_equals_each_image_alone_and_padding_is_ignored():
    head = _small_head()
    features = _pyramid(2)
    text = torch.randn(2, 7, 6)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    boxes = [torch.tensor([[10.0, 20.0, 90.0, 100.0], [0.0, 0.0, 255.0, 255.0]]),
             torch.tensor([[30.0, 40.0, 70.0, 80.0]])]
    labels = [torch.tensor([0, 1]), torch.tensor([5])]
    maps = [{0: [1, 2], 1: [5, 6]}, {5: [1, 3]}]
    with torch.no_grad():
        batched = head.predict_mask_probs(features, boxes, labels, text, mask, maps)
        alone = [
            head.predict_mask_probs([f[i : i + 1] for f in features], [boxes[i]], [labels[i]], text[i : i + 1],
                                    mask[i : i + 1], [maps[i]])[0]
            for i in range(2)
        ]
        longer = torch.cat((text, torch.randn(2, 5, 6)), dim=1)  # padded further, with garbage
        padded = head.predict_mask_probs(features, boxes, labels, longer, F.pad(mask, (0, 5)), maps)
    for b, a, p in zip(batched, alone, padded):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert torch.equal(b, p)
    with pytest.raises(ValueError, match="padding"):
        head.predict_mask_probs(features, boxes, labels, text, mask, [maps[0], {5: [1, 6]}])


def test_configuration_errors_name_the_keys():
    levels = [ShapeSpec(channels=8, stride=s) for s in STRIDES]
    cfg = _head_cfg()
    cfg.MODEL.MASK_ON = False
    with pytest.raises(ValueError, match="MODEL.MASK_ON"):
        MaskHead(cfg, levels, 6)
    cfg = _head_cfg()
    cfg.MODEL.ROI_MASK_HEAD.HG_SCALE = 2
    with pytest.raises(ValueError, match="HG_SCALE"):
        MaskHead(cfg, levels, 6)
    cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 16  # GLIPv2-H's two scales need a resolution divisible by 4
    assert MaskHead(cfg, levels, 6).mask_size == 32
    cfg = _head_cfg()
    cfg.MODEL.ROI_MASK_HEAD.CONV_LAYERS = [8, 16]
    with pytest.raises(ValueError, match="CONV_LAYERS"):
        MaskHead(cfg, levels, 6)
    model_cfg = tiny_cfg()
    model_cfg.MODEL.MASK_ON = True
    with pytest.raises(ValueError, match="TASK_HEADS does not name MaskHead"):
        build_model(model_cfg)


# --- inside a tiny GLIPv2 ------------------------------------------------------------------------

NAMES = {0: "red triangle", 1: "blue circle", 2: "green square"}
CATEGORIES = ["person", "bicycle", "traffic light", "dog", "red circle", "blue square", "tennis racket"]


def mask_cfg():
    cfg = tiny_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.GLIPV2.TASK_HEADS = ["MaskHead"]
    cfg.MODEL.ROI_MASK_HEAD.CONV_LAYERS = [64]
    return cfg


@pytest.fixture(scope="module")
def model(single_thread):
    torch.manual_seed(0)
    return build_model(mask_cfg())


def _masked_batch(model) -> list[dict]:
    """Two 128x128 scenes of drawn polygons (triangle, circle, square) with their polygon masks."""
    caption, spans = build_labeled_prompt(NAMES)
    prompt = encode_prompt(model.tokenizer, caption, spans, model.max_query_len, label_names=NAMES,
                           names_categories=True)
    colours = {0: (0, 0, 255), 1: (255, 0, 0), 2: (0, 255, 0)}  # BGR
    circle = [(60 + 25 * math.cos(a), 70 + 25 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    scenes = [
        [(0, [(10, 10), (50, 10), (30, 50)]), (1, circle)],
        [(2, [(70, 20), (110, 20), (110, 60), (70, 60)]), (0, [(20, 70), (70, 120), (20, 120)])],
    ]
    batch = []
    for scene in scenes:
        image = Image.new("RGB", (128, 128), (200, 200, 200))
        draw = ImageDraw.Draw(image)
        for label, points in scene:
            draw.polygon(points, fill=colours[label])
        polygons = [[np.array(points, dtype=np.float64).ravel()] for _, points in scene]
        instances = Instances((128, 128))
        bounds = [[*np.min(points, 0), *np.max(points, 0)] for _, points in scene]
        instances.gt_boxes = Boxes(torch.tensor(bounds, dtype=torch.float32))
        instances.gt_masks = PolygonMasks(polygons)
        instances.positive_map = token_map_to_positive_map(
            prompt.label_to_tokens, [label for label, _ in scene], len(prompt)
        ).bool()
        batch.append({"image": torch.as_tensor(np.asarray(image).transpose(2, 0, 1).copy()), "prompt": prompt,
                      "instances": instances, "file_name": f"scene{len(batch)}.png"})
    return batch


def test_model_outputs_masks_at_the_output_size(model):
    model.eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in _masked_batch(model)]
    batch = [x | {"height": 64, "width": 96} for x in batch]
    with torch.no_grad():
        outputs = model(batch)
        raw = model.inference(batch, do_postprocess=False)
    for output, network_size in zip(outputs, raw):
        instances = output["instances"]
        assert len(instances) > 0
        assert instances.pred_mask_probs.shape == (len(instances), 1, 28, 28)
        assert instances.pred_masks.shape == (len(instances), 64, 96) and instances.pred_masks.dtype == torch.bool
        expected = paste_masks(instances.pred_mask_probs, instances.pred_boxes.tensor, 64, 96)
        assert torch.equal(instances.pred_masks, expected)
        assert network_size["instances"].pred_masks.shape[1:] == (128, 128)


def test_zero_detections_give_empty_masks(model):
    model.eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in _masked_batch(model)]
    threshold = model.post_processor.score_thresh
    model.post_processor.score_thresh = 1.0
    try:
        with torch.no_grad():
            outputs = model(batch)
    finally:
        model.post_processor.score_thresh = threshold
    for output in outputs:
        instances = output["instances"]
        assert len(instances) == 0
        assert instances.pred_mask_probs.shape == (0, 1, 28, 28) and instances.pred_masks.shape == (0, 128, 128)


def test_batch_with_different_prompts_equals_each_image_alone(model):
    model.eval()
    batch = [{k: v for k, v in x.items() if k != "instances"} for x in _masked_batch(model)]
    other = {0: "green square", 1: "a shape"}
    caption, spans = build_labeled_prompt(other)
    batch[1]["prompt"] = encode_prompt(model.tokenizer, caption, spans, model.max_query_len, label_names=other,
                                       names_categories=True)
    with torch.no_grad():
        together = model(batch)
        alone = [model([x])[0] for x in batch]
    for t, a in zip(together, alone):
        t, a = t["instances"], a["instances"]
        assert len(t) == len(a) > 0
        torch.testing.assert_close(t.pred_boxes.tensor, a.pred_boxes.tensor, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(t.pred_mask_probs, a.pred_mask_probs, rtol=1e-4, atol=1e-4)


def test_training_adds_a_finite_mask_loss_that_drops_on_a_fixed_batch(single_thread):
    torch.manual_seed(0)
    model = build_model(mask_cfg()).train()
    batch = _masked_batch(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(12):
        losses = model(batch)
        assert "loss_mask" in losses and torch.isfinite(losses["loss_mask"])
        history.append(float(losses["loss_mask"]))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert history[-1] < 0.8 * history[0], history
    batch[0]["instances"].remove("gt_masks")  # an image trained on its boxes only adds no mask loss
    partly = model(batch)["loss_mask"]
    assert torch.isfinite(partly) and float(partly) > 0
    batch[1]["instances"].remove("gt_masks")
    assert float(model(batch)["loss_mask"]) == 0.0


def test_chunked_prompts_give_masks_for_every_chunk(single_thread):
    torch.manual_seed(0)
    predictor = GLIPv2Predictor(mask_cfg(), batch_size=4)
    predictor.prompt_builder.chunk_size = 3
    image = np.random.default_rng(4).integers(0, 256, size=(150, 190, 3), dtype=np.uint8)
    merged = predictor(image, CATEGORIES)
    chunks = predictor.build_prompts(CATEGORIES)
    assert len(chunks) == 3
    assert merged.pred_masks.shape == (len(merged), 150, 190) and len(merged) > 0
    assert torch.equal(merged.pred_masks, paste_masks(merged.pred_mask_probs, merged.pred_boxes.tensor, 150, 190))
    assert set(merged.pred_classes.tolist()) - {0, 1, 2}  # the later chunks' labels reach the merge too
