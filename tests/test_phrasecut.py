"""PhraseCut: the loader on a tiny fake release, its registration, the grounding mapper on its
records, and the referring-segmentation metrics on hand-computed masks (issue 11)."""

import json
import logging

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.structures import Boxes, BoxMode, Instances, PolygonMasks
from PIL import Image

from glipv2_d2.data.datasets import load_phrasecut_json, register_all_glipv2_datasets, register_phrasecut_datasets
from glipv2_d2.data.grounding_mapper import GroundingMapper
from glipv2_d2.engine.trainer import GLIPv2Trainer, is_grounding_test_set
from glipv2_d2.evaluation import PhraseCutEvaluator
from glipv2_d2.evaluation.phrasecut import (
    PhraseOverlap,
    boxes_to_masks,
    ground_truth_mask,
    phrase_prediction_mask,
    referring_metrics,
)
from glipv2_d2.modeling.language import build_tokenizer

from .tiny_model import base_cfg

HEIGHT, WIDTH = 30, 40


def _square(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    """PhraseCut's polygon form: [x, y] points."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


TASKS = [
    {
        "task_id": "101__1_2",
        "image_id": 101,
        "phrase": "the red car",
        "ann_ids": [1, 2],
        "instance_boxes": [[2, 2, 10, 8], [20, 4, 8, 10]],
        "Polygons": [[_square(2, 2, 12, 10)], [_square(20, 4, 28, 14), [[30, 0], [31, 0]]]],  # a 2-point part
        "phrase_structure": {"name": "car", "attributes": ["red"], "relation_descriptions": [], "type": "attribute"},
    },
    {
        "task_id": "102__3",
        "image_id": 102,
        "phrase": " dog ",
        "ann_ids": [3],
        "instance_boxes": [[0, 0, 12, 12]],
        "Polygons": [[[[0, 0], [12, 0], [12, 12]]]],
        "phrase_structure": {"name": "dog", "attributes": [], "relation_descriptions": [], "type": "name"},
    },
    {  # no phrase structure: skipped, as the official loader skips it
        "task_id": "101__4",
        "image_id": 101,
        "phrase": "sky",
        "ann_ids": [4],
        "instance_boxes": [[0, 0, 40, 5]],
        "Polygons": [[_square(0, 0, 40, 5)]],
        "phrase_structure": None,
    },
    {  # its only instance's polygon lies outside the 40 x 30 image: nothing to segment, skipped
        "task_id": "102__5",
        "image_id": 102,
        "phrase": "tree",
        "ann_ids": [5],
        "instance_boxes": [[1, 1, 5, 5]],
        "Polygons": [[_square(50, 50, 60, 60)]],
        "phrase_structure": {"name": "tree", "attributes": [], "relation_descriptions": [], "type": "name"},
    },
]


def write_fake_phrasecut(root, tasks=TASKS, with_image_info: bool = True, split: str = "val") -> None:
    """root/phrasecut/ as the release lays it out: refer_<split>.json, image_data_split.json, images/."""
    folder = root / "phrasecut"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    image_ids = sorted({t["image_id"] for t in tasks})
    for image_id in image_ids:
        pixels = np.full((HEIGHT, WIDTH, 3), image_id % 255, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"images/{image_id}.jpg")
    (folder / f"refer_{split}.json").write_text(json.dumps(tasks))
    if with_image_info:
        info = [{"image_id": i, "width": WIDTH, "height": HEIGHT, "split": split} for i in image_ids]
        (folder / "image_data_split.json").write_text(json.dumps(info))


@pytest.fixture
def phrasecut_root(tmp_path):
    write_fake_phrasecut(tmp_path)
    yield tmp_path
    register_phrasecut_datasets(str(tmp_path / "no_such_root"))


def _load(root, **kwargs) -> list[dict]:
    folder = root / "phrasecut"
    return load_phrasecut_json(str(folder / "refer_val.json"), str(folder / "images"), **kwargs)


# --- loader --------------------------------------------------------------------------------------


def test_records_hold_every_referred_instance_with_the_whole_phrase_as_span(phrasecut_root, caplog):
    with caplog.at_level(logging.WARNING, logger="glipv2_d2.data.datasets.phrasecut"):
        records = _load(phrasecut_root, image_info_json=str(phrasecut_root / "phrasecut" / "image_data_split.json"))
    car, dog = records
    assert car["caption"] == "the red car" and car["task_id"] == "101__1_2" and car["original_img_id"] == 101
    assert (car["image_id"], dog["image_id"]) == (0, 1)  # the tasks' positions: unique per record
    assert car["file_name"].endswith("phrasecut/images/101.jpg") and (car["height"], car["width"]) == (HEIGHT, WIDTH)
    assert (car["task"], car["weak"]) == ("grounding", False)
    assert [a["bbox"] for a in car["annotations"]] == [[2.0, 2.0, 10.0, 8.0], [20.0, 4.0, 8.0, 10.0]]
    assert car["annotations"][0]["segmentation"] == [[2.0, 2.0, 12.0, 2.0, 12.0, 10.0, 2.0, 10.0]]
    assert car["annotations"][1]["segmentation"] == [[20.0, 4.0, 28.0, 4.0, 28.0, 14.0, 20.0, 14.0]]  # part dropped
    assert all(a["bbox_mode"] == BoxMode.XYWH_ABS and a["category_id"] == 0 and a["iscrowd"] == 0
               for a in car["annotations"])
    assert [a["tokens_positive"] for a in car["annotations"]] == [[[0, 11]], [[0, 11]]]
    assert [a["phrase_ids"] for a in car["annotations"]] == [[0], [0]]
    assert car["phrases"] == [
        {"phrase_id": 0, "tokens_positive": [[0, 11]], "phrase_type": "attribute", "phrase_types": ["attribute"]}
    ]
    assert dog["annotations"][0]["tokens_positive"] == [[1, 4]]  # " dog ": the span leaves the blanks out
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "refer_val.json: 2 of 4 tasks loaded" in warning and "1 task without phrase_structure" in warning
    assert "1 task left without instances" in warning and "1 instances with polygons entirely outside" in warning


def test_sizes_are_read_from_the_images_without_the_metadata_file(tmp_path):
    write_fake_phrasecut(tmp_path, with_image_info=False)
    records = _load(tmp_path, require_structure=False)
    assert [r["caption"] for r in records] == ["the red car", " dog ", "sky"]
    assert {(r["height"], r["width"]) for r in records} == {(HEIGHT, WIDTH)}


def test_malformed_task_is_an_error_naming_file_and_task(tmp_path):
    bad = dict(TASKS[0], Polygons=TASKS[0]["Polygons"][:1])
    write_fake_phrasecut(tmp_path, tasks=[bad])
    with pytest.raises(ValueError, match=r"refer_val\.json: task #0 \(101__1_2\).*2 instance_boxes but 1 Polygons"):
        _load(tmp_path)
    write_fake_phrasecut(tmp_path, tasks=[dict(TASKS[0], phrase="  ")])
    with pytest.raises(ValueError, match=r"task #0 \(101__1_2\): 'phrase' must be a non-empty string"):
        _load(tmp_path)


def test_registration_follows_the_files_present_and_is_lazy(phrasecut_root):
    register_all_glipv2_datasets(phrasecut_root)
    assert "glipv2_phrasecut_val" in DatasetCatalog.list() and "glipv2_phrasecut_train" not in DatasetCatalog.list()
    metadata = MetadataCatalog.get("glipv2_phrasecut_val")
    assert metadata.evaluator_type == "phrasecut" and metadata.thing_classes == ["object"]
    assert not hasattr(metadata, "json_file")  # COCOEvaluator converts the records instead
    assert is_grounding_test_set("glipv2_phrasecut_val")
    assert [r["task_id"] for r in DatasetCatalog.get("glipv2_phrasecut_val")] == ["101__1_2", "102__3"]
    register_all_glipv2_datasets(phrasecut_root / "elsewhere")
    assert "glipv2_phrasecut_val" not in DatasetCatalog.list()


def test_grounding_mapper_trains_on_every_instance_with_its_mask(phrasecut_root):
    (car, _) = _load(phrasecut_root)
    cfg = base_cfg()
    cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER = "minilm"
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MIN_SIZE_TRAIN = (HEIGHT,)
    cfg.INPUT.RANDOM_FLIP = "none"
    tokenizer = build_tokenizer("minilm")
    out = GroundingMapper(cfg, True, tokenizer)(car, seed=0)
    instances = out["instances"]
    assert out["prompt"].caption == "the red car"
    words = tokenizer("the red car")["input_ids"][1:-1]
    assert instances.positive_map.tolist() == [[False] + [True] * len(words) + [False]] * 2
    assert isinstance(instances.gt_masks, PolygonMasks) and len(instances.gt_masks) == 2
    assert instances.gt_masks.polygons[0][0].tolist() == [2.0, 2.0, 12.0, 2.0, 12.0, 10.0, 2.0, 10.0]


# --- metrics -------------------------------------------------------------------------------------

SIDE = 6


def _mask(rows: slice, columns: slice) -> torch.Tensor:
    mask = torch.zeros((SIDE, SIDE), dtype=torch.bool)
    mask[rows, columns] = True
    return mask


def _detections(masks: list[torch.Tensor], scores: list[float], labels: list[int] | None = None) -> Instances:
    instances = Instances((SIDE, SIDE))
    instances.pred_masks = torch.stack(masks) if masks else torch.zeros((0, SIDE, SIDE), dtype=torch.bool)
    instances.scores = torch.tensor(scores, dtype=torch.float32)
    instances.pred_classes = torch.tensor(labels if labels is not None else [0] * len(scores), dtype=torch.int64)
    instances.pred_boxes = Boxes(torch.zeros((len(scores), 4)))
    return instances


def _input(image_id: int, polygons_per_instance: list[list[list[float]]]) -> dict:
    """One phrase whose instances have the given flat polygons."""
    return {
        "image_id": image_id,
        "height": SIDE,
        "width": SIDE,
        "phrases": [{"phrase_id": 0, "tokens_positive": [[0, 3]]}],
        "annotations": [{"segmentation": polygons, "phrase_ids": [0]} for polygons in polygons_per_instance],
    }


GT_2X2 = [[[0, 0, 1, 0, 1, 1, 0, 1]]]  # drawn as the official code draws it: rows 0-1, columns 0-1


def test_ground_truth_is_drawn_as_the_official_code_draws_it():
    square = ground_truth_mask(_input(0, GT_2X2)["annotations"], 0, (SIDE, SIDE), "t")
    assert torch.equal(square, _mask(slice(0, 2), slice(0, 2)))  # outline included, as PIL draws it
    two = ground_truth_mask(_input(0, GT_2X2 + [[[4, 4, 5, 4, 5, 5]]])["annotations"], 0, (SIDE, SIDE), "t")
    assert int(two.sum()) == 4 + 3 and bool(two[4, 4] and two[4, 5] and two[5, 5]) and not two[5, 4]
    assert ground_truth_mask(_input(0, GT_2X2)["annotations"], 7, (SIDE, SIDE), "t") is None


def test_phrase_mask_is_the_union_above_threshold_else_the_best_else_empty():
    a, b, c = _mask(slice(0, 1), slice(0, 6)), _mask(slice(5, 6), slice(0, 6)), _mask(slice(2, 3), slice(0, 1))
    both = phrase_prediction_mask(_detections([a, b, c], [0.9, 0.6, 0.4]), 0, 0.5)
    assert torch.equal(both, a | b)
    assert torch.equal(phrase_prediction_mask(_detections([a, b, c], [0.2, 0.3, 0.1]), 0, 0.5), b)
    assert not phrase_prediction_mask(_detections([], []), 0, 0.5).any()
    other_phrase = _detections([a, b], [0.9, 0.8], labels=[1, 0])
    assert torch.equal(phrase_prediction_mask(other_phrase, 0, 0.5), b)


def test_boxes_become_masks_by_pixel_centres():
    masks = boxes_to_masks(torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.4, 0.6, 2.5, 2.5]]), (4, 5))
    assert masks.shape == (2, 4, 5)
    assert masks[0].nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert masks[1].nonzero().tolist() == [[1, 0], [1, 1]]  # centre 0.5 of row 0 lies above 0.6


def test_metrics_on_hand_computed_masks():
    gt = _mask(slice(0, 2), slice(0, 2))  # 4 pixels
    cases = [
        (_detections([_mask(slice(0, 2), slice(0, 3)), _mask(slice(4, 6), slice(4, 6))], [0.9, 0.3]), 4, 6),
        (_detections([gt, _mask(slice(5, 6), slice(5, 6))], [0.2, 0.1]), 4, 4),  # none passes: the best one
        (_detections([], []), 0, 4),
        (_detections([_mask(slice(0, 1), slice(0, 2))], [0.8]), 2, 4),  # IoU exactly 0.5
    ]
    evaluator = PhraseCutEvaluator(score_threshold=0.5, distributed=False)
    evaluator.reset()
    for image_id, (detections, _, _) in enumerate(cases):
        evaluator.process([_input(image_id, GT_2X2)], [{"instances": detections}])
    assert [(o.intersection, o.union) for _, (o,) in evaluator._per_image] == [(i, u) for _, i, u in cases]
    results = evaluator.evaluate()["phrasecut"]
    # IoUs 2/3, 1, 0, 1/2; official precision counts IoU strictly above the threshold
    assert results["mIoU"] == pytest.approx(100 * (2 / 3 + 1 + 0 + 0.5) / 4)
    assert results["cIoU"] == pytest.approx(100 * 10 / 18)
    assert (results["Pr@0.5"], results["Pr@0.7"], results["Pr@0.9"]) == (50.0, 25.0, 25.0)


def test_box_baseline_scores_filled_boxes():
    detections = _detections([torch.zeros((SIDE, SIDE), dtype=torch.bool)], [0.9])
    detections.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 2.0, 4.0]]))  # 2 x 4 = 8 pixels over the 4 of the truth
    evaluator = PhraseCutEvaluator(use_boxes=True, distributed=False)
    evaluator.process([_input(0, GT_2X2)], [{"instances": detections}])
    assert evaluator.evaluate() == {"phrasecut_box": pytest.approx({"mIoU": 50.0, "cIoU": 50.0, "Pr@0.5": 0.0,
                                                                    "Pr@0.7": 0.0, "Pr@0.9": 0.0})}


def test_missing_masks_and_repeated_images_are_named():
    detections = _detections([_mask(slice(0, 1), slice(0, 1))], [0.9])
    detections.remove("pred_masks")
    with pytest.raises(ValueError, match="image_id 3: the model output has no pred_masks; run with MODEL.MASK_ON"):
        PhraseCutEvaluator(distributed=False).process([_input(3, GT_2X2)], [{"instances": detections}])
    evaluator = PhraseCutEvaluator(distributed=False)
    for _ in range(2):
        evaluator.process([_input(3, GT_2X2)], [{"instances": _detections([], [])}])
    with pytest.raises(ValueError, match=r"image_ids \[3\] were evaluated more than once"):
        evaluator.evaluate()


def test_referring_metrics_of_no_overlap_are_zero():
    assert referring_metrics([PhraseOverlap(0, 0), PhraseOverlap(0, 5)]) == {
        "mIoU": 0.0, "cIoU": 0.0, "Pr@0.5": 0.0, "Pr@0.7": 0.0, "Pr@0.9": 0.0
    }


# --- the trainer's evaluator ---------------------------------------------------------------------


def test_trainer_scores_phrasecut_masks_boxes_and_mask_ap(phrasecut_root, tmp_path):
    register_phrasecut_datasets(str(phrasecut_root))
    cfg = base_cfg()
    cfg.MODEL.MASK_ON = True
    evaluator = GLIPv2Trainer.build_evaluator(cfg, "glipv2_phrasecut_val", str(tmp_path / "inference"))
    assert isinstance(evaluator, DatasetEvaluators)
    phrasecut, boxes, coco = evaluator._evaluators
    assert (phrasecut.use_boxes, boxes.use_boxes, phrasecut.score_threshold) == (False, True, 0.5)
    assert isinstance(coco, COCOEvaluator) and coco._tasks == ("bbox", "segm")

    evaluator.reset()
    for record in DatasetCatalog.get("glipv2_phrasecut_val"):
        image_hw = (record["height"], record["width"])
        masks = [ground_truth_mask([a], 0, image_hw, "gt") for a in record["annotations"]]
        boxes = [BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for a in record["annotations"]]
        instances = Instances(image_hw)
        instances.pred_masks = torch.stack(masks)
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.linspace(0.9, 0.8, len(masks))
        instances.pred_classes = torch.zeros(len(masks), dtype=torch.int64)
        evaluator.process([record], [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["phrasecut"]["mIoU"] == pytest.approx(100.0) and results["phrasecut"]["Pr@0.9"] == 100.0
    assert results["phrasecut_box"]["mIoU"] < 100.0  # a filled box is not the triangle of the dog
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    # COCOEvaluator draws the ground truth with pycocotools (outline excluded): IoU ~0.8, not 1
    assert results["segm"]["AP50"] == pytest.approx(100.0) and results["segm"]["AP"] < 100.0
