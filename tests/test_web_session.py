"""The web demo's request handling on the tiny model, without a browser: every hostile input from
the page (empty or 10,000-character prompt, a file that is no image, a huge image, two requests at
once) ends as a message or a result, and the session keeps serving afterwards."""

import json
import threading
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest
from PIL import Image

from glipv2_d2.detection_records import load_schema
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.web import session as web_session
from glipv2_d2.web.inputs import MAX_SIDE
from glipv2_d2.web.session import DemoRequest, DemoSession
from glipv2_d2.web.tasks import TASKS, available_tasks

from .tiny_model import tiny_cfg


@pytest.fixture(scope="module")
def session(single_thread, tmp_path_factory):
    demo = DemoSession(lambda: GLIPv2Predictor(tiny_cfg()), tmp_path_factory.mktemp("web"))
    demo.start().join()
    assert demo.ready, demo.status()
    return demo


def detect(**fields) -> DemoRequest:
    return DemoRequest(**{"task": "detect", "prompt": "person, rocket", "builtin": "astronaut",
                          "score_threshold": 0.0, **fields})


def test_a_request_gives_picture_table_and_a_schema_valid_json(session):
    result = session.run(detect(top_k=2))
    assert result.ok and result.picture.ndim == 3
    assert 1 <= len(result.table) <= 4 and {row[1] for row in result.table} <= {"person", "rocket"}
    record = json.loads(open(result.json_path).read())
    jsonschema.validate(record, load_schema())
    assert [d["phrase"] for d in record["detections"]] == [row[1] for row in result.table]
    assert "detections at score >= 0" in result.message


def test_a_caption_without_phrases_is_grounded_phrase_by_phrase(session):
    result = session.run(detect(task="ground", prompt="A small dog and a red ball.", top_k=1))
    assert result.ok
    assert {row[1] for row in result.table} == {"A small dog", "a red ball"}
    listed = session.run(detect(task="ground", prompt="A small dog and a red ball.", phrases="dog", top_k=1))
    assert {row[1] for row in listed.table} == {"dog"}


@pytest.mark.parametrize("prompt, expected", [
    ("", "The prompt is empty"),
    ("   ", "The prompt is empty"),
    ("x" * 10_000, "10,000 characters"),
    (" , ,", "names no category"),
])
def test_bad_prompts_get_a_message(session, prompt, expected):
    result = session.run(detect(prompt=prompt))
    assert not result.ok and expected in result.message


def test_a_caption_longer_than_the_token_limit_gets_a_message(session):
    result = session.run(detect(task="ground", prompt="a dog " * 300, phrases="dog"))
    assert not result.ok and "token limit" in result.message


def test_a_file_that_is_no_image_gets_a_message(session, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_bytes(b"%PDF-1.4 not an image at all")
    result = session.run(detect(upload=str(fake)))
    assert not result.ok and "notes.png is not an image" in result.message


def test_a_huge_image_is_refused_and_a_large_one_shrunk(session, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("L", (12_000, 8_000)).save(huge)  # 96 megapixels, a few hundred kB as a PNG
    refused = session.run(detect(upload=str(huge)))
    assert not refused.ok and "12000 x 8000 pixels" in refused.message
    large = tmp_path / "large.jpg"
    Image.new("RGB", (4_000, 1_000), (40, 90, 200)).save(large)
    shrunk = session.run(detect(upload=str(large)))
    assert shrunk.ok and f"shrunk to {MAX_SIDE} x 512" in shrunk.message
    assert json.loads(open(shrunk.json_path).read())["image_size"] == [512, MAX_SIDE]


def test_two_requests_at_once_both_finish(session):
    results = [None, None]

    def run(slot: int) -> None:
        results[slot] = session.run(detect(prompt=["person", "rocket"][slot]))

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(result is not None and result.ok for result in results)
    assert {row[1] for row in results[0].table} == {"person"} and {row[1] for row in results[1].table} == {"rocket"}


def test_no_image_and_unknown_tasks_get_a_message(session):
    assert "No image" in session.run(detect(builtin=None)).message
    assert "cannot 'caption'" in session.run(detect(task="caption")).message


def test_a_failed_model_load_is_shown_and_requests_answer_with_it():
    def broken():
        raise FileNotFoundError("weights/missing.pth")

    demo = DemoSession(broken)
    demo.start().join()
    assert "could not be loaded: FileNotFoundError" in demo.status()
    assert "weights/missing.pth" in demo.run(detect()).message


def test_tasks_follow_the_heads_and_methods_the_model_offers():
    def predictor(heads, **methods):
        return SimpleNamespace(model=SimpleNamespace(task_heads=dict.fromkeys(heads)), **methods)

    assert [t.key for t in available_tasks(predictor([]))] == ["detect", "ground"]
    assert [t.key for t in available_tasks(predictor(["MaskHead", "CaptionHead"]))] == ["detect", "ground", "segment"]
    with_caption = predictor(["CaptionHead", "VQAHead"], caption=lambda image: {}, answer=lambda image, q: {})
    assert [t.key for t in available_tasks(with_caption)] == ["detect", "ground", "answer", "caption"]


def test_a_caption_task_shows_the_generated_text_and_its_boxes(session, monkeypatch):
    instances = session.predictor(np.zeros((64, 64, 3), np.uint8), ["dog"])
    monkeypatch.setattr(session.predictor, "caption", lambda image: {"caption": "a dog", "instances": instances},
                        raising=False)
    monkeypatch.setattr(web_session, "available_tasks", lambda predictor: [t for t in TASKS if t.key == "caption"])
    result = session.run(detect(task="caption", prompt=""))
    assert result.ok and result.answer == "a dog" and len(result.table) == len(instances)
