"""Masks where a user looks: the demo's picture fills each drawn detection's mask in its box's colour,
and its JSON carries every mask as COCO RLE that decodes back to the same pixels."""

import json

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.structures import Instances
from PIL import Image

import tools.demo as demo
from glipv2_d2.detection_records import detection_record, mask_to_rle
from glipv2_d2.visualizer import draw_grounded_detections, phrase_color

from .test_demo_tool import CONFIG, StandInPredictor

HEIGHT, WIDTH = 48, 64


def _masks() -> torch.Tensor:
    """One bool mask per stand-in detection: a block inside its box, the last one empty."""
    masks = torch.zeros(5, HEIGHT, WIDTH, dtype=torch.bool)
    masks[0, 5:18, 4:18] = True
    masks[1, 5:19, 4:18] = True
    masks[2, 10:24, 33:48] = True
    masks[3, 1:9, 1:9] = True
    return masks


class SegmentingStandInPredictor(StandInPredictor):
    def __call__(self, image, prompt, phrases=None, spans=None) -> Instances:
        instances = super().__call__(image, prompt, phrases, spans)
        instances.pred_masks = _masks()
        return instances


def _detections(with_masks: bool) -> Instances:
    instances = StandInPredictor(None)(np.zeros((HEIGHT, WIDTH, 3), np.uint8), ["dog", "cat"])
    if with_masks:
        instances.pred_masks = _masks()
    return instances


def test_rle_round_trip_through_json():
    mask = np.random.default_rng(0).random((HEIGHT, WIDTH)) < 0.3
    rle = json.loads(json.dumps(mask_to_rle(torch.from_numpy(mask))))
    assert rle["size"] == [HEIGHT, WIDTH] and isinstance(rle["counts"], str)
    decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), mask)


def test_demo_json_carries_each_detections_mask(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "GLIPv2Predictor", SegmentingStandInPredictor)
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 90, np.uint8)).save(tmp_path / "in" / "a.png")
    code = demo.main(["--config-file", CONFIG, "--input", str(tmp_path / "in" / "a.png"), "--categories", "dog,cat",
                      "--output", str(tmp_path / "out"), "--score-threshold", "0.45", "--cpu"])
    assert code == 0
    detections = json.loads((tmp_path / "out" / "a.png.json").read_text())["detections"]
    assert len(detections) == 5
    for detection, mask in zip(detections, _masks()):
        rle = detection["mask_rle"]
        decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), mask.numpy())


def test_detections_without_masks_have_no_mask_field():
    record = detection_record("a.png", ["dog", "cat"], _detections(with_masks=False))
    assert len(record["detections"]) == 5 and all("mask_rle" not in d for d in record["detections"])


def test_masks_are_filled_in_their_box_colour_and_nothing_else_changes():
    image = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
    plain = draw_grounded_detections(image, _detections(with_masks=False), score_threshold=0.45).astype(int)
    masked = draw_grounded_detections(image, _detections(with_masks=True), score_threshold=0.45).astype(int)
    scale = plain.shape[0] // HEIGHT
    inside = masked[20 * scale, 40 * scale]  # detection 2 (a dog), away from its label and outline
    expected = 0.5 * 90 + 0.5 * 255 * phrase_color("dog")
    assert np.abs(inside - expected).max() <= 12, (inside, expected)
    assert np.array_equal(plain[20 * scale, 40 * scale], [90, 90, 90])
    below_every_box = slice(40 * scale, None)
    assert np.array_equal(masked[below_every_box], plain[below_every_box])
    unchanged = masked[2 * scale, 2 * scale]  # detection 3's mask, but it scores below the threshold
    assert np.array_equal(unchanged, plain[2 * scale, 2 * scale])


def test_an_image_without_detections_above_the_threshold_draws_no_mask():
    image = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
    picture = draw_grounded_detections(image, _detections(with_masks=True), score_threshold=0.99)
    assert np.array_equal(np.unique(picture.reshape(-1, 3), axis=0), [[90, 90, 90]])
