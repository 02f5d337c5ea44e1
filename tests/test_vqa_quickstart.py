"""The synthetic VQA set: every answer and every grounded box is true of the drawn scene, the
vocabulary file comes with the train split, and its records train through the VQA mapper."""

import json

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from glipv2_d2.config import setup_cfg
from glipv2_d2.data.datasets import VQA_EVALUATOR_TYPE, load_grounding_coco_json
from glipv2_d2.data.vqa_answers import AnswerVocabulary, build_answer_vocabulary
from glipv2_d2.data.vqa_mapper import VQAMapper
from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_d2.evaluation.vqa import VQAEvaluator, majority_answer_per_type
from glipv2_quickstart import generate_synthetic_shapes, register_synthetic_vqa, vqa_vocabulary_path
from glipv2_quickstart.scene_text import plural
from glipv2_quickstart.shapes import ALL_PAIRS, SHAPES

from .tiny_model import REPO, tiny_cfg

SIZES = {"num_train": 12, "num_val": 6, "num_heldout": 1}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    register_synthetic_vqa(root, **SIZES)
    train = DatasetCatalog.get("glipv2_synthetic_vqa_train")
    val = DatasetCatalog.get("glipv2_synthetic_vqa_val")
    yield root, train, val
    register_synthetic_vqa()  # back to the default root


def _scene_objects(root, split):
    """image id -> [((colour, shape), [x, y, w, h]), ...] as drawn."""
    json_file = generate_synthetic_shapes(root, **SIZES)[split]
    scenes = load_grounding_coco_json(json_file, str(root / split), image_keys=())
    return {s["image_id"]: [(ALL_PAIRS[a["category_id"] - 1], [float(v) for v in a["bbox"]])
                            for a in s["annotations"]] for s in scenes}


def test_answers_and_boxes_are_true_of_the_scene(synthetic):
    root, train, _ = synthetic
    scenes = _scene_objects(root, "train")
    seen_types = set()
    for record in train:
        objects = scenes[record["image_id"]]
        question, answer = record["question"], record["multiple_choice_answer"]
        assert record["answers"] == [answer] * 10 and record["task"] == "vqa"
        boxes = [a["bbox"] for a in record["annotations"]]
        spans = {tuple(map(tuple, a["tokens_positive"])) for a in record["annotations"]}
        assert len(spans) <= 1 and all(a["grounds_answer"] for a in record["annotations"])
        phrase = question[slice(*next(iter(spans))[0])] if spans else None
        qtype = record["question_type"]
        seen_types.add(qtype)
        if qtype == "how many":
            shape = next(s for s in SHAPES if plural(s) == question.split()[2])
            assert int(answer) == len(boxes) == sum(pair[1] == shape for pair, _ in objects)
            assert phrase in (None, plural(shape))
        elif qtype == "what colour":
            (box,) = boxes
            assert [pair for pair, b in objects if b == box] == [(answer, phrase)]
        elif qtype == "what shape":
            (box,) = boxes
            assert [pair for pair, b in objects if b == box] == [(phrase.split()[0], answer)]
        else:
            colour, shape = question[len("is there a "):-1].split()[-2:]
            present = [b for pair, b in objects if pair == (colour, shape)]
            assert answer == ("yes" if present else "no") and boxes == present
    assert seen_types == {"how many", "what colour", "what shape", "is there"}


def test_train_split_writes_its_vocabulary_and_val_is_a_vqa_test_set(synthetic):
    root, train, val = synthetic
    vocabulary = AnswerVocabulary.load(vqa_vocabulary_path(root))
    assert vocabulary.answers == build_answer_vocabulary(train).answers
    assert json.loads(vqa_vocabulary_path(root).read_text()) == vocabulary.answers
    assert MetadataCatalog.get("glipv2_synthetic_vqa_val").evaluator_type == VQA_EVALUATOR_TYPE
    baseline = majority_answer_per_type(train)
    evaluator = VQAEvaluator(baseline)
    evaluator.reset()
    evaluator.process(val, [{"vqa": {"answer": baseline[r["question_type"]]}} for r in val])
    results = evaluator.evaluate()["vqa"]
    assert results["accuracy"] == results["baseline_accuracy"]
    expected = sum(r["multiple_choice_answer"] == baseline[r["question_type"]] for r in val) / len(val)
    assert results["accuracy"] == pytest.approx(100 * expected)


def test_grounded_records_train_through_the_vqa_mapper(synthetic):
    root, train, _ = synthetic
    cfg = tiny_cfg()
    cfg.MODEL.VQA.GROUNDED = True
    cfg.MODEL.VQA.ANSWER_VOCAB_FILE = str(vqa_vocabulary_path(root))
    cfg.MODEL.VQA.NUM_ANSWERS = len(AnswerVocabulary.load(vqa_vocabulary_path(root)))
    mapper = VQAMapper(cfg, is_train=True)
    record = next(r for r in train if r["question_type"] == "what colour")
    out = mapper(record, seed=0)
    vocabulary = mapper.vocabulary
    assert out["vqa_targets"][vocabulary.id_of(record["multiple_choice_answer"])] == 1.0
    assert out["vqa_targets"].sum() == 1.0
    mask_token = out["prompt"].input_ids.tolist().index(mapper.prompt_builder.tokenizer.mask_token_id)
    assert len(out["instances"]) == 1 and out["instances"].positive_map[0, mask_token]
    assert out["loss_weight"] == 1.0


def test_the_quick_start_stage_trains_the_heads_only_and_reports_accuracy_next_to_the_baseline(
    synthetic, tmp_path, single_thread
):
    root, train, _ = synthetic
    cfg = setup_cfg(REPO / "configs" / "quickstart" / "vqa.yaml", freeze=False)
    cfg.merge_from_list([
        "MODEL.LANGUAGE_BACKBONE.LOAD_PRETRAINED", False, "MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS", 2,
        "MODEL.VQA.ANSWER_VOCAB_FILE", str(vqa_vocabulary_path(root)),
        "MODEL.VQA.NUM_ANSWERS", len(build_answer_vocabulary(train)),
        "INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 160, "INPUT.MIN_SIZE_TEST", 128,
        "INPUT.MAX_SIZE_TEST", 160, "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 2, "SOLVER.STEP_FRACTIONS", (),
        "SOLVER.WARMUP_ITERS", 0, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", str(tmp_path / "out"),
        "MODEL.WEIGHTS", str(tmp_path / "detector.pth"),
    ])
    detector_cfg = cfg.clone()
    detector_cfg.merge_from_list(["MODEL.GLIPV2.TASK_HEADS", (), "SOLVER.TRAIN_ONLY_PREFIXES", ()])
    torch.manual_seed(1)
    detector = {k: v.detach().clone() for k, v in build_model(detector_cfg).state_dict().items()}
    torch.save({"model": detector}, tmp_path / "detector.pth")
    trainer = GLIPv2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    before = {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    trainer.train()
    after = trainer.unwrapped_model.state_dict()
    trained = {k for k in after if not torch.equal(after[k], before[k])}
    assert trained and all(k.startswith(("head.", "task_heads.VQAHead.")) for k in trained)
    assert any(k.startswith("task_heads.VQAHead.classifier") for k in trained)
    assert all(torch.equal(after[k], v) for k, v in detector.items() if not k.startswith("head."))
    results = trainer._last_eval_results["vqa"]
    assert 0.0 <= results["accuracy"] <= 100.0 and results["num_questions"] == len(
        DatasetCatalog.get("glipv2_synthetic_vqa_val"))
    assert results["baseline_accuracy"] > 0.0
