"""Outputs a person reads: colours follow the phrase (not its index), long vocabularies get numbered
labels and one legend, top-k per phrase, and JSON records that follow the documented schema with
token and character spans that point at the phrase."""

import json

import jsonschema
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from glipv2_d2.detection_records import SCHEMA_ID, detection_record, load_schema
from glipv2_d2.detection_selection import select_detections
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.visualizer import LEGEND_MIN_PHRASES, draw_grounded_detections, phrase_color

from .tiny_model import tiny_cfg


def detections(phrases: list[str], scores: list[float], labels: list[int] | None = None) -> Instances:
    count = len(phrases)
    instances = Instances((200, 300))
    instances.pred_boxes = Boxes(torch.tensor([[10.0 + 25 * i, 20, 40 + 25 * i, 90] for i in range(count)]))
    instances.scores = torch.tensor(scores)
    instances.pred_classes = torch.tensor(labels if labels is not None else list(range(count)))
    instances.pred_phrases = np.array(phrases, dtype=object)
    return instances


@pytest.fixture(scope="module")
def predictor(single_thread):
    return GLIPv2Predictor(tiny_cfg())


def test_a_phrase_has_one_colour_whatever_its_label_or_prompt():
    assert np.array_equal(phrase_color("dog"), phrase_color(" Dog "))
    picture_a = draw_grounded_detections(np.full((200, 300, 3), 128, np.uint8), detections(["dog"], [0.9], [0]), 0.5)
    picture_b = draw_grounded_detections(np.full((200, 300, 3), 128, np.uint8), detections(["dog"], [0.9], [7]), 0.5)
    assert np.array_equal(picture_a, picture_b)
    assert not np.array_equal(phrase_color("dog"), phrase_color("cat"))


def test_long_vocabularies_get_numbered_labels_and_one_legend_beside_the_picture():
    image = np.full((200, 300, 3), 128, np.uint8)
    few = draw_grounded_detections(image, detections([f"thing {i}" for i in range(2)], [0.9, 0.8]), 0.5)
    many_phrases = [f"thing {i}" for i in range(LEGEND_MIN_PHRASES)]
    many = draw_grounded_detections(image, detections(many_phrases, [0.9] * LEGEND_MIN_PHRASES), 0.5)
    assert many.shape[0] == few.shape[0] and many.shape[1] > few.shape[1]  # a strip on the right
    legend = many[:, few.shape[1]:]
    swatch = np.round(255 * phrase_color("thing 0")).astype(int)
    assert (np.abs(legend.reshape(-1, 3).astype(int) - swatch).max(axis=1) <= 1).sum() > 20


def test_top_k_keeps_the_best_boxes_of_each_phrase_above_the_threshold():
    instances = detections(["dog", "cat", "dog", "dog", "cat"], [0.5, 0.9, 0.8, 0.2, 0.4], [0, 1, 0, 0, 1])
    kept = select_detections(instances, score_threshold=0.3, top_k_per_phrase=1)
    assert kept.pred_phrases.tolist() == ["cat", "dog"] and kept.scores.tolist() == pytest.approx([0.9, 0.8])
    assert select_detections(instances, 0.3, 0).scores.tolist() == pytest.approx([0.9, 0.8, 0.5, 0.4])


def test_records_of_the_model_follow_the_schema_and_point_at_their_phrase(predictor):
    caption = "a red circle left of a blue square"
    spans = [[(0, 12)], [(21, 34)]]
    image = np.full((96, 128, 3), 90, np.uint8)
    instances = predictor(image, caption, spans=spans)
    record = json.loads(json.dumps(detection_record("x.png", caption, instances,
                                                    predictor.build_prompts(caption, spans=spans),
                                                    predictor.model.tokenizer)))
    jsonschema.validate(record, load_schema())
    assert record["schema"] == SCHEMA_ID and record["image_size"] == [96, 128] and len(record["detections"]) > 0
    for detection in record["detections"]:
        (start, end), = detection["char_spans"]
        assert caption[start:end] == detection["phrase"] == ["a red circle", "a blue square"][detection["label"]]
        assert detection["token_spans"] == [[1, 4]] if detection["label"] == 0 else [[6, 9]]
        x0, y0, x1, y1 = detection["box_xyxy"]
        assert 0 <= x0 <= x1 <= 128 and 0 <= y0 <= y1 <= 96


def test_a_chunked_vocabulary_names_the_prompt_each_label_was_read_from(predictor):
    predictor.prompt_builder.chunk_size = 2
    try:
        names = ["circle", "square", "triangle"]
        prompts = predictor.build_prompts(names)
        instances = predictor(np.full((96, 128, 3), 90, np.uint8), names)
    finally:
        predictor.prompt_builder.chunk_size = None
    record = detection_record("x.png", names, instances, prompts, predictor.model.tokenizer)
    jsonschema.validate(record, load_schema())
    assert len(record["prompt_texts"]) == 2
    for detection in record["detections"]:
        text = record["prompt_texts"][detection["prompt_index"]]
        (start, end), = detection["char_spans"]
        assert text[start:end] == detection["phrase"]


def test_a_record_without_prompt_locations_fails_the_schema():
    record = detection_record("x.png", ["dog"], detections(["dog"], [0.9]))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(record, load_schema())
