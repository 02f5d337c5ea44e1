"""Instance-segmentation evaluation (issue 11): mask AP through Detectron2's COCOEvaluator and LVIS
fixed AP on tiny hand-made sets, the trainer's evaluator tasks under MODEL.MASK_ON, and masks
surviving the merge of chunked prompts."""

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from glipv2_d2.data.datasets import register_grounding_coco, unregister_dataset
from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_d2.evaluation import LVISFixedAPEvaluator, NumpyCompatibleLVISEvaluator
from glipv2_d2.evaluation.prompted_inference import merge_chunk_detections

from .tiny_model import base_cfg

SIDE = 48
COCO_NAME = "test_segmentation_evaluation_coco"
LVIS_NAME = "test_segmentation_evaluation_lvis"


def _polygon(x0: float, y0: float, x1: float, y1: float, notch: bool) -> list[float]:
    """A rectangle, or an L shape (its box is the rectangle's) so that masks and boxes differ."""
    if not notch:
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    return [x0, y0, xm, y0, xm, ym, x1, ym, x1, y1, x0, y1]


# (image id, category id, [x0, y0, x1, y1], L-shaped)
OBJECTS = [(1, 1, [4, 4, 24, 20], True), (1, 2, [26, 10, 44, 40], False), (2, 1, [10, 12, 30, 42], True),
           (2, 2, [2, 2, 14, 14], False), (2, 2, [30, 2, 46, 22], True)]


def _json(lvis: bool) -> dict:
    images = [{"id": i, "file_name": f"{i}.png", "height": SIDE, "width": SIDE} for i in (1, 2)]
    categories = [{"id": 1, "name": "cup"}, {"id": 2, "name": "plate"}]
    annotations = []
    for index, (image_id, category_id, (x0, y0, x1, y1), notch) in enumerate(OBJECTS, start=1):
        polygon = _polygon(x0, y0, x1, y1, notch)
        rle = mask_util.frPyObjects([polygon], SIDE, SIDE)[0]
        annotations.append({
            "id": index, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": [polygon], "area": float(mask_util.area(rle)),
        })
    if lvis:
        for image in images:
            image.update(coco_url=f"http://images.cocodataset.org/val2017/{image['id']}.png",
                         neg_category_ids=[], not_exhaustive_category_ids=[])
        for category in categories:
            category.update(frequency="f", synset=f"{category['name']}.n.01", image_count=2, instance_count=3)
    return {"images": images, "annotations": annotations, "categories": categories}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("segm")
    coco_json, lvis_json = folder / "coco.json", folder / "lvis.json"
    coco_json.write_text(json.dumps(_json(lvis=False)))
    lvis_json.write_text(json.dumps(_json(lvis=True)))
    register_grounding_coco(COCO_NAME, str(coco_json), str(folder))
    unregister_dataset(LVIS_NAME)
    MetadataCatalog.get(LVIS_NAME).set(json_file=str(lvis_json), evaluator_type="lvis")
    yield
    unregister_dataset(COCO_NAME)
    unregister_dataset(LVIS_NAME)


def ground_truth_as_predictions(shift: int = 0) -> list[tuple[list[dict], list[dict]]]:
    """One batch per image: its ground-truth boxes and masks (masks moved right by `shift`
    pixels, boxes kept) with distinct scores and 0-based labels."""
    batches, score = [], 1.0
    for image_id in (1, 2):
        objects = [o for o in OBJECTS if o[0] == image_id]
        masks = []
        for _, _, (x0, y0, x1, y1), notch in objects:
            mask = mask_util.decode(mask_util.frPyObjects([_polygon(x0, y0, x1, y1, notch)], SIDE, SIDE))[:, :, 0]
            masks.append(np.roll(mask, shift, axis=1))
        instances = Instances((SIDE, SIDE))
        instances.pred_boxes = Boxes(torch.tensor([o[2] for o in objects], dtype=torch.float32))
        instances.pred_masks = torch.from_numpy(np.stack(masks)).bool()
        instances.pred_classes = torch.tensor([o[1] - 1 for o in objects])
        instances.scores = score - 0.01 * torch.arange(len(objects), dtype=torch.float32)
        score -= 0.1
        batches.append(([{"image_id": image_id, "height": SIDE, "width": SIDE}], [{"instances": instances}]))
    return batches


def replay(evaluator, batches) -> dict:
    evaluator.reset()
    for inputs, outputs in batches:
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def test_coco_mask_ap_of_ground_truth_is_perfect_and_of_shifted_masks_lower(registered, tmp_path):
    evaluator = COCOEvaluator(COCO_NAME, tasks=("bbox", "segm"), output_dir=str(tmp_path))
    exact = replay(evaluator, ground_truth_as_predictions())
    assert exact["bbox"]["AP"] == pytest.approx(100.0) and exact["segm"]["AP"] == pytest.approx(100.0)
    shifted = replay(evaluator, ground_truth_as_predictions(shift=3))
    assert shifted["bbox"]["AP"] == pytest.approx(100.0)  # the boxes did not move
    assert 0.0 < shifted["segm"]["AP"] < 90.0 and shifted["segm"]["AP50"] == pytest.approx(100.0)


def test_lvis_fixed_ap_covers_masks(registered, tmp_path):
    evaluator = LVISFixedAPEvaluator(LVIS_NAME, tasks=("bbox", "segm"), output_dir=str(tmp_path))
    exact = replay(evaluator, ground_truth_as_predictions())
    assert exact["segm"]["AP"] == pytest.approx(100.0) and exact["bbox"]["AP"] == pytest.approx(100.0)
    shifted = replay(evaluator, ground_truth_as_predictions(shift=3))["segm"]
    assert 0.0 < shifted["AP"] < 90.0
    # One detection per category kept: "plate" (3 objects) reaches recall 1/3 at precision 1, "cup" 1/2.
    top_one = replay(LVISFixedAPEvaluator(LVIS_NAME, 1, ("segm",), output_dir=str(tmp_path)),
                     ground_truth_as_predictions())["segm"]
    thresholds = np.linspace(0.0, 1.0, 101)
    assert top_one["AP"] == pytest.approx(100 * np.mean([np.mean(thresholds <= 1 / 2), np.mean(thresholds <= 1 / 3)]))


@pytest.mark.parametrize("fixed_ap", [False, True])
def test_trainer_evaluates_masks_when_mask_on(registered, fixed_ap, tmp_path):
    cfg = base_cfg()
    cfg.TEST.LVIS_FIXED_AP = fixed_ap
    assert GLIPv2Trainer.build_evaluator(cfg, COCO_NAME, str(tmp_path))._tasks == ("bbox",)
    cfg.MODEL.MASK_ON = True
    assert GLIPv2Trainer.build_evaluator(cfg, COCO_NAME, str(tmp_path))._tasks == ("bbox", "segm")
    lvis = GLIPv2Trainer.build_evaluator(cfg, LVIS_NAME, str(tmp_path))
    assert type(lvis) is (LVISFixedAPEvaluator if fixed_ap else NumpyCompatibleLVISEvaluator)
    assert lvis._tasks == ("bbox", "segm")


def _chunk(scores: list[float], labels: list[int], fill: int) -> Instances:
    """Detections of one prompt chunk, each mask filled with `fill` + its index (to trace it)."""
    instances = Instances((4, 5))
    instances.pred_boxes = Boxes(torch.zeros((len(scores), 4)))
    instances.scores = torch.tensor(scores)
    instances.pred_classes = torch.tensor(labels, dtype=torch.int64)
    masks = [torch.full((4, 5), fill + i) for i in range(len(scores))]
    instances.pred_masks = torch.stack(masks) if masks else torch.zeros((0, 4, 5), dtype=torch.int64)
    return instances


def test_masks_follow_their_detections_through_the_chunk_merge():
    parts = [_chunk([0.9, 0.2], [0, 1], fill=10), _chunk([], [], fill=0), _chunk([0.5, 0.95], [40, 41], fill=20)]
    merged = merge_chunk_detections(parts, max_per_image=None)
    assert merged.pred_masks.shape == (4, 4, 5)
    assert merged.pred_masks[:, 0, 0].tolist() == [10, 11, 20, 21] and merged.pred_classes.tolist() == [0, 1, 40, 41]
    capped = merge_chunk_detections(parts, max_per_image=3)
    assert capped.pred_masks[:, 0, 0].tolist() == [21, 10, 20]
    assert capped.scores.tolist() == pytest.approx([0.95, 0.9, 0.5])


def test_records_of_the_tiny_set_keep_their_masks(registered):
    records = DatasetCatalog.get(COCO_NAME)
    assert [len(r["annotations"]) for r in records] == [2, 3]
    first = records[0]["annotations"][0]
    assert first["segmentation"] == [_polygon(4, 4, 24, 20, True)] and first["bbox_mode"] == BoxMode.XYWH_ABS
