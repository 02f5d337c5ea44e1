"""VQA data: the VQAv2 loader and registration on tiny fake files, the answer vocabulary and soft
scores, the question prompt (with [MASK]) and the VQA mapper, and its answers to bad input."""

import json
import logging

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from glipv2_d2.data.datasets import (
    VQA_EVALUATOR_TYPE,
    load_vqav2_json,
    register_all_glipv2_datasets,
    register_vqav2_datasets,
)
from glipv2_d2.data.prompt_builder import PromptBuilder
from glipv2_d2.data.vqa_answers import AnswerVocabulary, build_answer_vocabulary, count_unknown_answers, soft_scores
from glipv2_d2.data.vqa_mapper import VQAMapper
from glipv2_d2.data.vqa_prompts import ANSWER_PHRASE, build_question_prompt

from .conftest import half_red_half_blue_png
from .tiny_model import tiny_cfg

HEIGHT, WIDTH = 64, 96


def _answers(*pairs):
    """[(answer, times), ...] -> VQAv2 answer dicts."""
    flat = [answer for answer, times in pairs for _ in range(times)]
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(flat)]


def write_fake_vqav2(root, split="train2014"):
    """Two questions about two COCO images in the official json layout under root/vqav2/."""
    folder = root / "vqav2"
    folder.mkdir(parents=True, exist_ok=True)
    questions = {
        "data_subtype": split,
        "questions": [
            {"image_id": 9, "question": "How many dogs are there?", "question_id": 90},
            {"image_id": 42, "question": "Is it raining?", "question_id": 420},
        ],
    }
    annotations = {
        "annotations": [
            {"question_id": 420, "image_id": 42, "question_type": "is it", "answer_type": "yes/no",
             "multiple_choice_answer": "no", "answers": _answers(("no", 8), ("yes", 2))},
            {"question_id": 90, "image_id": 9, "question_type": "how many", "answer_type": "number",
             "multiple_choice_answer": "2", "answers": _answers(("2", 6), ("two", 2), ("3", 2))},
        ]
    }
    subset = split[:-4]
    (folder / f"v2_OpenEnded_mscoco_{subset}2014_questions.json").write_text(json.dumps(questions))
    (folder / f"v2_mscoco_{subset}2014_annotations.json").write_text(json.dumps(annotations))
    return folder


def test_loader_reads_questions_answers_and_coco_file_names(tmp_path):
    folder = write_fake_vqav2(tmp_path)
    records = load_vqav2_json(
        str(folder / "v2_OpenEnded_mscoco_train2014_questions.json"),
        str(folder / "v2_mscoco_train2014_annotations.json"),
        "imgs",
    )
    assert [r["question_id"] for r in records] == [90, 420]
    first = records[0]
    assert first["file_name"] == "imgs/COCO_train2014_000000000009.jpg"
    assert first["answers"] == ["2"] * 6 + ["two"] * 2 + ["3"] * 2
    assert (first["question_type"], first["answer_type"], first["task"]) == ("how many", "number", "vqa")


def test_loader_refuses_a_question_without_annotation(tmp_path):
    folder = write_fake_vqav2(tmp_path)
    annotations = folder / "v2_mscoco_train2014_annotations.json"
    data = json.loads(annotations.read_text())
    data["annotations"] = data["annotations"][:1]
    annotations.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="question 90"):
        load_vqav2_json(str(folder / "v2_OpenEnded_mscoco_train2014_questions.json"), str(annotations), "imgs")


def test_registration_finds_the_standard_layout(tmp_path):
    write_fake_vqav2(tmp_path)
    register_vqav2_datasets(str(tmp_path))
    try:
        assert MetadataCatalog.get("glipv2_vqav2_train").evaluator_type == VQA_EVALUATOR_TYPE
        assert MetadataCatalog.get("glipv2_vqav2_train").image_root == str(tmp_path / "coco" / "train2014")
        assert len(DatasetCatalog.get("glipv2_vqav2_train")) == 2
        assert "glipv2_vqav2_val" not in DatasetCatalog.list()
    finally:
        register_vqav2_datasets(str(tmp_path / "elsewhere"))
    assert "glipv2_vqav2_train" not in DatasetCatalog.list()


def _qa(answers, **extra):
    return {"question": "what is it?", "answers": answers, **extra}


def test_vocabulary_orders_by_question_frequency_with_normalised_answers(tmp_path):
    records = [
        _qa(["two"] * 10),  # normalised to "2"
        _qa(["2"] * 6 + ["3"] * 4),
        _qa(["yes"] * 10),
        _qa(["no"] * 10),
        _qa(["no"] * 7 + ["yes"] * 3),
        _qa(["red"] * 10, multiple_choice_answer="Red"),
    ]
    assert build_answer_vocabulary(records).answers == ["2", "no", "red", "yes"]
    assert build_answer_vocabulary(records, max_answers=2).answers == ["2", "no"]
    assert build_answer_vocabulary(records, min_count=2).answers == ["2", "no"]
    path = tmp_path / "vocab.json"
    build_answer_vocabulary(records).save(path)
    assert AnswerVocabulary.load(path).answers == ["2", "no", "red", "yes"]


def test_vocabulary_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_vqa_vocab"):
        AnswerVocabulary.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="repeats"):
        AnswerVocabulary(["yes", "no", "yes"])


def test_soft_scores_are_min_count_over_3_and_drop_unknown_answers():
    vocabulary = AnswerVocabulary(["2", "3", "yes"])
    target, unknown = soft_scores(["2"] * 6 + ["two"] * 2 + ["3"] * 2, vocabulary)
    assert target.tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert unknown == []
    target, unknown = soft_scores(["2", "purple", "purple"], vocabulary)
    assert target.tolist() == pytest.approx([1 / 3, 0.0, 0.0])
    assert unknown == ["purple"]
    records = [_qa(["2", "purple", "purple"]), _qa(["purple"] * 3)]
    assert count_unknown_answers(records, vocabulary) == (5, 6, 1)


@pytest.fixture(scope="module")
def builder():
    return PromptBuilder(tiny_cfg())


def test_grounded_question_appends_the_mask_token_as_the_answer_phrase(builder):
    question = "what colour is the circle?"
    built = build_question_prompt(builder, question, [[[19, 25]]], grounded=True)
    prompt = built.prompt
    assert prompt.caption == f"{question} {builder.tokenizer.mask_token}"
    assert built.answer_label == 1
    (mask_token,) = prompt.label_to_tokens[1]
    assert int(prompt.input_ids[mask_token]) == builder.tokenizer.mask_token_id
    assert builder.tokenizer.decode(prompt.input_ids[prompt.label_to_tokens[0]]) == "circle"
    assert prompt.label_names == {0: "circle", 1: ANSWER_PHRASE}
    plain = build_question_prompt(builder, question, grounded=False)
    assert plain.answer_label is None and builder.tokenizer.mask_token_id not in plain.prompt.input_ids.tolist()


@pytest.mark.parametrize("question", ["", "   ", None])
def test_empty_question_is_refused(builder, question):
    with pytest.raises(ValueError, match="empty question"):
        build_question_prompt(builder, question, grounded=True)


def test_question_over_the_token_limit_is_refused_counting_the_mask_token(builder):
    limit = builder.max_query_len
    fits = " ".join(["dog"] * (limit - 2))  # [CLS] + words + [SEP]
    assert len(build_question_prompt(builder, fits, grounded=False).prompt) == limit
    with pytest.raises(ValueError, match=f"{limit}-token limit.*MASK"):
        build_question_prompt(builder, fits, grounded=True)


@pytest.fixture()
def vqa_cfg(tmp_path):
    cfg = tiny_cfg()
    AnswerVocabulary(["2", "3", "yes", "no"]).save(tmp_path / "vocab.json")
    cfg.MODEL.VQA.ANSWER_VOCAB_FILE = str(tmp_path / "vocab.json")
    cfg.MODEL.VQA.NUM_ANSWERS = 4
    cfg.MODEL.VQA.GROUNDED = True
    cfg.INPUT.MIN_SIZE_TRAIN = (HEIGHT,)
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    return cfg


def _grounded_record(image_file, **extra):
    question = "how many dogs are there?"
    box = {"bbox": [10, 5, 30, 40], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 0}
    return {
        "file_name": image_file,
        "height": HEIGHT,
        "width": WIDTH,
        "image_id": 1,
        "question_id": 7,
        "question": question,
        "answers": ["2"] * 6 + ["two"] * 2 + ["3"] * 2,
        "task": "vqa",
        "annotations": [
            {**box, "tokens_positive": [[9, 13]], "grounds_answer": True},  # "dogs", and what the answer counts
            {**box, "bbox": [50, 5, 80, 40], "tokens_positive": [[9, 13]]},
            {**box, "bbox": [60, 10, 70, 20]},  # no phrase: dropped
        ],
        **extra,
    }


def test_training_mapper_gives_targets_and_boxes_on_phrases_and_mask(vqa_cfg, tmp_path):
    image_file = half_red_half_blue_png(tmp_path / "scene.png", HEIGHT, WIDTH)
    mapper = VQAMapper(vqa_cfg, is_train=True)
    assert not any(type(a).__name__ == "RandomFlip" for a in mapper.augmentations.augs)
    out = mapper(_grounded_record(image_file), seed=3)
    assert out["vqa_targets"].tolist() == pytest.approx([1.0, 2 / 3, 0.0, 0.0])
    prompt = out["prompt"]
    mask_token = prompt.input_ids.tolist().index(mapper.prompt_builder.tokenizer.mask_token_id)
    dogs = prompt.label_to_tokens[0]
    positive = out["instances"].positive_map
    assert positive.dtype == torch.bool and positive.shape == (2, len(prompt))
    assert positive[0].nonzero().flatten().tolist() == sorted([*dogs, mask_token])
    assert positive[1].nonzero().flatten().tolist() == dogs
    assert out["instances"].gt_boxes.tensor.tolist() == [[10, 5, 30, 40], [50, 5, 80, 40]]
    assert out["loss_weight"] == 1.0 and "annotations" not in out


def test_records_without_boxes_train_no_grounding_loss(vqa_cfg, tmp_path):
    image_file = half_red_half_blue_png(tmp_path / "scene.png", HEIGHT, WIDTH)
    out = VQAMapper(vqa_cfg, is_train=True)(_grounded_record(image_file, annotations=[]), seed=0)
    assert len(out["instances"]) == 0 and out["loss_weight"] == 0.0


def test_test_mapper_keeps_the_ground_truth_for_the_evaluator(vqa_cfg, tmp_path):
    image_file = half_red_half_blue_png(tmp_path / "scene.png", HEIGHT, WIDTH)
    out = VQAMapper(vqa_cfg, is_train=False)(_grounded_record(image_file))
    assert out["answers"][0] == "2" and "vqa_targets" not in out and "instances" not in out
    assert out["prompt"].label_names == {0: "dogs", 1: ANSWER_PHRASE}


def test_mapper_errors_name_the_question(vqa_cfg, tmp_path):
    image_file = half_red_half_blue_png(tmp_path / "scene.png", HEIGHT, WIDTH)
    mapper = VQAMapper(vqa_cfg, is_train=True)
    with pytest.raises(ValueError, match=r"question 7\).*empty question"):
        mapper(_grounded_record(image_file, question="", annotations=[]), seed=0)
    with pytest.raises(ValueError, match=r"question 7\).*'answers'"):
        mapper(_grounded_record(image_file, answers=[]), seed=0)
    with pytest.raises(ValueError, match=r"question 7\).*outside the caption"):
        mapper(_grounded_record(image_file, question="dogs?"), seed=0)


def test_unknown_training_answers_are_dropped_and_counted_in_one_warning(vqa_cfg, tmp_path, caplog):
    image_file = half_red_half_blue_png(tmp_path / "scene.png", HEIGHT, WIDTH)
    record = _grounded_record(image_file, answers=["purple"] * 7 + ["yes"] * 3)
    mapper = VQAMapper(vqa_cfg, is_train=True)
    with caplog.at_level(logging.WARNING, logger="glipv2_d2.data.vqa_mapper"):
        assert mapper.report_unknown_answers("toy_vqa", [record, _grounded_record(image_file)]) == 7
    assert "toy_vqa: 7 of 20 annotator answers are not in the 4-answer vocabulary" in caplog.text
    assert mapper(record, seed=0)["vqa_targets"].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_mapper_refuses_a_vocabulary_of_another_size(vqa_cfg):
    vqa_cfg.MODEL.VQA.NUM_ANSWERS = 5
    with pytest.raises(ValueError, match="has 4 answers but MODEL.VQA.NUM_ANSWERS is 5"):
        VQAMapper(vqa_cfg, is_train=True)


def test_vocabulary_tool_writes_the_file_training_reads(tmp_path, monkeypatch, capsys):
    from tools import build_vqa_vocab

    write_fake_vqav2(tmp_path)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    output = tmp_path / "vqav2" / "answer_vocab.json"
    try:
        assert build_vqa_vocab.main(["--dataset", "glipv2_vqav2_train", "--output", str(output)]) == 0
        assert AnswerVocabulary.load(output).answers == ["2", "no"]  # one question each: alphabetical
        assert "set MODEL.VQA.NUM_ANSWERS 2" in capsys.readouterr().out
        assert build_vqa_vocab.main(["--dataset", "glipv2_vqav2_val", "--output", str(output)]) == 1
    finally:
        monkeypatch.delenv("DETECTRON2_DATASETS")
        register_all_glipv2_datasets()  # every builtin name back at the default root
