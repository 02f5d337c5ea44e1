"""tools/demo.py with a stand-in predictor: outputs never replace inputs, bad files are skipped and
counted, the console gives both numbers, and the pictures keep labels readable and colours per category."""

import functools
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.data.detection_utils import read_image
from detectron2.structures import Boxes, Instances
from PIL import Image
from transformers import BertModel

import tools.demo as demo
from glipv2_d2 import visualizer
from glipv2_d2.data.prompt_builder import PromptBuilder
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.modeling.language.bert import BertTextEncoder
from glipv2_d2.modeling.language.tokenizer import build_tokenizer, minilm_model_dir

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "quickstart" / "demo.yaml")
SCORES = [0.9, 0.8, 0.5, 0.2, 0.1]


@functools.cache
def minilm_prompt_builder() -> PromptBuilder:
    return PromptBuilder(build_tokenizer("minilm"))


class StandInPredictor:
    """Five fixed detections per image (three at score >= 0.45, two of them near-identical boxes);
    prompts are built as the real predictor builds them."""

    build_prompts = GLIPv2Predictor.build_prompts

    def __init__(self, cfg):
        self.cfg = cfg
        self.prompt_builder = minilm_prompt_builder()
        self.model = SimpleNamespace(tokenizer=self.prompt_builder.tokenizer)

    def load_image(self, image, input_format: str = "BGR") -> np.ndarray:
        return read_image(image, format="BGR")

    def __call__(self, image: np.ndarray, prompt, phrases=None, spans=None) -> Instances:
        instances = Instances(image.shape[:2])
        instances.pred_boxes = Boxes(torch.tensor([[2.0, 2, 20, 20], [2, 2, 20, 21], [30, 5, 50, 25],
                                                   [0, 0, 10, 10], [5, 5, 15, 15]]))
        instances.scores = torch.tensor(SCORES)
        instances.pred_classes = torch.tensor([0, 1, 0, 1, 0])
        instances.pred_phrases = np.array(["dog", "cat", "dog", "cat", "dog"], dtype=object)
        return instances


@pytest.fixture(autouse=True)
def stand_in_predictor(monkeypatch):
    monkeypatch.setattr(demo, "GLIPv2Predictor", StandInPredictor)


def write_image(path: Path, value: int, size: tuple[int, int] = (64, 48)) -> bytes:
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path.read_bytes()


def run_demo(inputs: list[Path], output: Path) -> int:
    return demo.main(["--config-file", CONFIG, "--input", *map(str, inputs), "--categories", "dog,cat",
                      "--output", str(output), "--score-threshold", "0.45", "--cpu"])


def test_output_folder_holding_an_input_is_refused_and_originals_are_untouched(tmp_path, capsys):
    originals = {name: write_image(tmp_path / name, 40 * i) for i, name in enumerate(["a.jpg", "b.png"])}
    for inputs in ([tmp_path], [tmp_path / "a.jpg"]):
        assert run_demo(inputs, tmp_path) == 1
        assert f"--output {tmp_path} is a folder of input images" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == originals


def test_inputs_sharing_a_stem_or_a_name_get_distinct_outputs(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "other").mkdir()
    inputs = [tmp_path / "in" / "a.jpg", tmp_path / "in" / "a.png", tmp_path / "other" / "a.png"]
    for value, path in enumerate(inputs):
        write_image(path, 60 * value)
    assert run_demo([tmp_path / "in", inputs[2]], tmp_path / "out") == 0
    written = {path.name for path in (tmp_path / "out").iterdir()}
    assert written == {"a.jpg.png", "a.jpg.json", "a.png.png", "a.png.json", "a.png-2.png", "a.png-2.json"}
    sources = [json.loads((tmp_path / "out" / f"{name}.json").read_text())["image"]
               for name in ("a.jpg", "a.png", "a.png-2")]
    assert sources == [str(path) for path in inputs]


def test_unreadable_and_missing_inputs_are_reported_skipped_and_fail_the_run(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_image(folder / "1.png", 10)
    (folder / "2.jpg").write_bytes(b"not an image")
    write_image(folder / "3.png", 200)
    assert run_demo([folder, tmp_path / "missing.png"], tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"skipped {folder / '2.jpg'}" in err and f"skipped {tmp_path / 'missing.png'}" in err
    assert "2 of 4 inputs could not be read" in err
    assert {path.name for path in (tmp_path / "out").glob("*.png")} == {"1.png.png", "3.png.png"}


def test_console_line_gives_detections_and_drawn_counts(tmp_path, capsys):
    write_image(tmp_path / "a.png", 90)
    assert run_demo([tmp_path / "a.png"], tmp_path / "out") == 0
    assert "a.png: 5 detections, 3 drawn at score >= 0.45 ->" in capsys.readouterr().out


def test_near_identical_boxes_are_drawn_once_best_first():
    boxes = Boxes(torch.tensor([[0.0, 0, 100, 100], [0, 0, 100, 99], [200, 0, 300, 100], [1, 0, 100, 100]]))
    groups = visualizer.near_identical_groups(boxes, torch.tensor([0.5, 0.9, 0.7, 0.6]))
    assert groups == [[1, 3, 0], [2]]


def test_boxes_of_one_category_share_a_colour(tmp_path):
    image = np.full((320, 640, 3), 128, dtype=np.uint8)  # 640 wide: drawn at scale 1
    instances = Instances((320, 640))
    instances.pred_boxes = Boxes(torch.tensor([[100.0, 100, 160, 200], [300, 100, 360, 200], [500, 100, 560, 200]]))
    instances.scores = torch.tensor([0.9, 0.8, 0.7])
    instances.pred_classes = torch.tensor([3, 3, 4])
    instances.pred_phrases = np.array(["dog", "dog", "cat"], dtype=object)
    picture = visualizer.draw_grounded_detections(image, instances, score_threshold=0.5)
    left_edges = [picture[150, x - 1 : x + 2].astype(int).tolist() for x in (100, 300, 500)]
    assert left_edges[0] == left_edges[1] != left_edges[2]
    assert left_edges[0] != [[128, 128, 128]] * 3


def test_labels_stay_inside_the_image_and_clear_of_each_other():
    fitting = visualizer.LabelFittingVisualizer(np.zeros((100, 200, 3), dtype=np.uint8))
    for _ in range(2):
        fitting.draw_text("a long label 0.99", (190.0, 95.0), horizontal_alignment="left")
    first, second = fitting.label_extents
    for left, top, right, bottom in (first, second):
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 100
    assert not visualizer._overlap(first, second)


def transformers_warnings(load) -> str:
    """Everything transformers logs while `load` runs."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        load()
    finally:
        logger.removeHandler(handler)
    return "\n".join(records)


def test_text_encoder_loads_minilm_without_reporting_its_unused_pooler():
    folder = minilm_model_dir()
    assert "pooler" in transformers_warnings(lambda: BertModel.from_pretrained(str(folder), add_pooling_layer=False))
    assert "pooler" not in transformers_warnings(lambda: BertTextEncoder.from_pretrained(folder))
