"""End-to-end behaviour of the GLIPv2 model and predictor on a tiny random model."""

import numpy as np
import pytest
import torch
from PIL import Image

from glipv2_d2.engine.predictor import GLIPv2Predictor

from .tiny_model import tiny_cfg

CATEGORIES = ["person", "bicycle", "traffic light", "dog", "red circle", "blue square", "tennis racket"]


def _image(seed: int, height: int = 150, width: int = 190) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def predictor() -> GLIPv2Predictor:
    torch.manual_seed(0)
    return GLIPv2Predictor(tiny_cfg(), batch_size=4)


def _as_rows(instances) -> torch.Tensor:
    return torch.cat([instances.pred_boxes.tensor, instances.scores[:, None],
                      instances.pred_classes[:, None].float()], dim=1)


def _assert_same_detections(a, b, atol=1e-4):
    assert len(a) == len(b) > 0
    order_a, order_b = torch.argsort(a.scores, descending=True), torch.argsort(b.scores, descending=True)
    torch.testing.assert_close(_as_rows(a)[order_a], _as_rows(b)[order_b], rtol=1e-4, atol=atol)


def test_outputs_are_detectron2_instances_in_input_pixels(predictor):
    result = predictor(_image(0), CATEGORIES[:3])
    assert result.image_size == (150, 190)
    boxes = result.pred_boxes.tensor
    assert len(result) > 0 and boxes.shape[1] == 4
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 190).all() and (boxes[:, 3] <= 150).all()
    assert set(result.pred_classes.tolist()) <= {0, 1, 2}
    assert (result.scores > 0).all() and (result.scores <= 1).all()
    assert all(p == CATEGORIES[c] for p, c in zip(result.pred_phrases, result.pred_classes.tolist()))


def test_batched_prompts_per_image_equal_single_runs(predictor):
    images = [_image(1), _image(2, 120, 200)]
    prompts = [CATEGORIES[:3], "a dog chasing a red circle"]
    batched = predictor.predict_batch(images, prompts)
    alone = [predictor.predict_batch([im], [p])[0] for im, p in zip(images, prompts)]
    for b, a in zip(batched, alone):
        _assert_same_detections(b, a)


def test_output_is_deterministic(predictor):
    first = predictor(_image(3), CATEGORIES)
    second = predictor(_image(3), CATEGORIES)
    _assert_same_detections(first, second, atol=0)


def test_chunked_vocabulary_equals_each_chunk_run_alone_and_merged(predictor):
    predictor.prompt_builder.chunk_size = 3
    try:
        merged = predictor(_image(4), CATEGORIES)
        chunks = predictor.build_prompts(CATEGORIES)
    finally:
        predictor.prompt_builder.chunk_size = None
    assert [len(c.label_names) for c in chunks] == [3, 3, 1]
    image = _image(4)
    parts = []
    for chunk in chunks:
        inputs = predictor._model_input(image, chunk)
        with torch.no_grad():
            parts.append(predictor.model([inputs])[0]["instances"])
    from detectron2.structures import Instances

    every = Instances.cat(parts)
    limit = predictor.cfg.TEST.DETECTIONS_PER_IMAGE
    assert len(every) > limit == len(merged)  # merged chunks keep the image's best `limit` boxes
    _assert_same_detections(merged, every[torch.argsort(every.scores, descending=True)[:limit]])
    labels_of_chunk = [set(c.label_names) for c in chunks]
    for part, labels in zip(parts, labels_of_chunk):
        assert set(part.pred_classes.tolist()) <= labels


def test_dynamic_padding_equals_official_max_length_padding(predictor):
    cfg = tiny_cfg()
    cfg.MODEL.LANGUAGE_BACKBONE.PAD_MAX = True
    padded = GLIPv2Predictor(cfg)
    padded.model.load_state_dict(predictor.model.state_dict())
    image = _image(5)
    _assert_same_detections(padded(image, CATEGORIES[:4]), predictor(image, CATEGORIES[:4]))


def test_shared_prompt_is_encoded_once(predictor, monkeypatch):
    calls = []
    encoder = predictor.model.language_backbone
    original = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda ids, mask: calls.append(ids.shape[0]) or original(ids, mask))
    predictor.predict_batch([_image(6), _image(7), _image(8)], [CATEGORIES[:2], CATEGORIES[:2], ["dog"]])
    assert calls == [2]


def test_grounding_caption_with_phrases(predictor):
    caption = "a small red circle left of a blue square"
    result = predictor(_image(9), caption, phrases=["red circle", "blue square"])
    assert set(result.pred_phrases) <= {"red circle", "blue square"} and len(result) > 0


def test_grayscale_rgba_and_16bit_images_are_converted(predictor, tmp_path):
    rgb = _image(10)
    gray16 = (np.random.default_rng(1).integers(0, 65536, size=(150, 190))).astype(np.uint16)
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((150, 190), 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    for name in ["gray.png", "rgba.png", "gray16.png"]:
        assert len(predictor(tmp_path / name, CATEGORIES[:2])) > 0
    from glipv2_d2.data.image_io import read_image

    loaded16 = read_image(tmp_path / "gray16.png")
    expected = (gray16.astype(np.float64) / 65535 * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(loaded16[:, :, 0], expected)
    assert np.array_equal(read_image(tmp_path / "rgba.png", format="RGB"), rgb)


@pytest.mark.parametrize("prompt, message", [
    ([], "empty prompt"),
    ("   ", "caption"),
    (["person", ""], "empty"),
    ("\u200b", "caption"),
])
def test_bad_prompts_are_named(predictor, prompt, message):
    with pytest.raises(ValueError, match=message):
        predictor(_image(11), prompt)


def test_category_that_vanishes_in_tokenization_is_named(predictor):
    with pytest.raises(ValueError, match="label 1: phrase .* covers no token"):
        predictor(_image(11), ["person", "\u200b\u200b"])


def test_unreadable_image_is_named(predictor, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        predictor(broken, ["person"])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predictor(tmp_path / "missing.png", ["person"])


def test_rescaled_detections_leave_the_network_output_unchanged(predictor):
    from glipv2_d2.data.image_io import array_to_bgr
    from glipv2_d2.modeling.meta_arch import rescale_instances

    inputs = predictor._model_input(array_to_bgr(_image(12)), predictor.build_prompts(CATEGORIES[:2])[0])
    with torch.no_grad():
        (raw,) = predictor.model.inference([inputs], do_postprocess=False)
    boxes = raw["instances"].pred_boxes.tensor.clone()
    rescaled = rescale_instances(raw["instances"], 300, 380)
    assert torch.equal(raw["instances"].pred_boxes.tensor, boxes)
    height, width = raw["instances"].image_size
    torch.testing.assert_close(rescaled.pred_boxes.tensor, boxes * torch.tensor([380 / width, 300 / height] * 2))


def test_anchor_strides_and_widths_come_from_the_backbone(predictor):
    model = predictor.model
    shapes = sorted(model.backbone.output_shape().values(), key=lambda shape: shape.stride)
    assert model.anchor_generator.strides == tuple(shape.stride for shape in shapes) == (8, 16, 32, 64, 128)
    assert model.fusion.layers[0].b_attn.layer_norm_v.normalized_shape == (shapes[0].channels,)
    cfg = tiny_cfg()
    cfg.MODEL.ATSS.ANCHOR_SIZES = [32, 64, 128]
    with pytest.raises(ValueError, match="ANCHOR_SIZES has 3 sizes .* 5 feature levels of strides"):
        GLIPv2Predictor(cfg)
