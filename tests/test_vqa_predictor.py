"""Users' side of VQA on the tiny model: GLIPv2Predictor.answer / answer_batch, the demo's --task
vqa, and clear errors for bad questions before the model runs."""

import json

import numpy as np
import pytest
import torch

import tools.demo as demo
from glipv2_d2.data.vqa_answers import AnswerVocabulary
from glipv2_d2.engine.predictor import GLIPv2Predictor

from .tiny_model import REPO, tiny_cfg

ANSWERS = ["2", "3", "yes", "no", "red"]
QUESTION = "is there a red circle?"


def vqa_opts(vocabulary_file) -> list[str]:
    """The tiny model (tests/tiny_model.py) with a grounded VQA head, as config overrides."""
    return [
        "MODEL.LANGUAGE_BACKBONE.LOAD_PRETRAINED", "False", "MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS", "2",
        "MODEL.DYHEAD.PRIOR_PROB", "0.5", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
        "MODEL.GLIPV2.TASK_HEADS", '("VQAHead",)', "MODEL.VQA.NUM_ANSWERS", str(len(ANSWERS)),
        "MODEL.VQA.ANSWER_VOCAB_FILE", str(vocabulary_file), "MODEL.VQA.GROUNDED", "True", "MODEL.VQA.TOP_K", "3",
    ]


@pytest.fixture(scope="module")
def vocabulary_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vqa") / "answers.json"
    AnswerVocabulary(ANSWERS).save(path)
    return path


@pytest.fixture(scope="module")
def predictor(vocabulary_file):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.merge_from_list(vqa_opts(vocabulary_file))
    return GLIPv2Predictor(cfg, batch_size=2)


def _image(seed: int, height: int = 90, width: int = 120) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_answer_gives_the_answer_top_k_and_boxes_of_phrases_and_answer(predictor):
    result = predictor.answer(_image(0), QUESTION, phrases=["red circle"])
    assert result["question"] == QUESTION and result["answer"] in ANSWERS
    assert [t["answer"] for t in result["topk"]][0] == result["answer"] and len(result["topk"]) == 3
    assert result["score"] == result["topk"][0]["score"]
    instances = result["instances"]
    assert instances.image_size == (90, 120)
    assert set(instances.pred_phrases) == {"red circle", f"answer: {result['answer']}"}
    boxes = instances.pred_boxes.tensor
    assert (boxes[:, 2] <= 120).all() and (boxes[:, 3] <= 90).all()


def test_answer_batch_equals_one_question_at_a_time(predictor):
    images, questions = [_image(1), _image(2), _image(3)], [QUESTION, "how many squares are there?", "what?"]
    batch = predictor.answer_batch(images, questions)
    for image, question, result in zip(images, questions, batch):
        single = predictor.answer(image, question)
        assert (single["answer"], single["question"]) == (result["answer"], question)
        assert single["score"] == pytest.approx(result["score"], abs=1e-5)


@pytest.mark.parametrize(
    ("question", "phrases", "message"),
    [
        ("", None, "empty question"),
        ("  ", None, "empty question"),
        (" ".join(["dog"] * 130), None, "128-token limit"),
        (QUESTION, ["square"], "does not occur"),
    ],
)
def test_bad_questions_are_refused_before_the_model_runs(predictor, monkeypatch, question, phrases, message):
    monkeypatch.setattr(predictor.model, "inference", lambda *args: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match=message):
        predictor.answer(_image(0), question, phrases)


def test_a_model_without_vqa_head_cannot_answer(vocabulary_file):
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="no VQAHead"):
        GLIPv2Predictor(cfg).answer(_image(0), QUESTION)


def test_demo_draws_the_answer_and_writes_its_json(vocabulary_file, tmp_path, capsys):
    image = tmp_path / "in" / "scene.png"
    image.parent.mkdir()
    from PIL import Image

    Image.fromarray(_image(4)).save(image)
    config = str(REPO / "configs" / "quickstart" / "demo.yaml")
    args = ["--task", "vqa", "--config-file", config, "--input", str(image), "--question", QUESTION,
            "--phrases", "red circle", "--output", str(tmp_path / "out"), "--score-threshold", "0.3", "--cpu",
            *vqa_opts(vocabulary_file)]
    assert demo.main(args) == 0
    record = json.loads((tmp_path / "out" / "scene.png.json").read_text())
    assert record["question"] == QUESTION and record["answer"] in ANSWERS
    assert record["topk"][0]["answer"] == record["answer"] and len(record["topk"]) == 3
    assert {d["phrase"] for d in record["detections"]} == {"red circle", f"answer: {record['answer']}"}
    drawn = np.asarray(Image.open(tmp_path / "out" / "scene.png.png"))
    assert drawn.shape[2] == 3 and drawn.shape[0] >= 90
    assert repr(record["answer"]) in capsys.readouterr().out
    no_question = [a for a in args if a not in ("--question", QUESTION)]
    assert demo.main(no_question) == 2
    assert demo.main([*args[:2], "--categories", "dog", *args[2:]]) == 2
