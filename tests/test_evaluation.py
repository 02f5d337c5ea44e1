"""GLIPv2Trainer.test end to end on the synthetic shapes: COCO AP, LVIS AP, LVIS fixed AP, chunked
prompts, and fixed AP of hand-checkable predictions."""

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from lvis import LVIS, LVISEval, LVISResults

from glipv2_d2.data.prompt_builder import PromptBuilder
from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_d2.evaluation import LVISFixedAPEvaluator, NumpyCompatibleLVISEvaluator, lvis_numpy_float_alias
from glipv2_quickstart import register_synthetic_lvis, register_synthetic_shapes

from .detection_matching import assert_same_detections
from .tiny_model import tiny_cfg

NUM_VAL = 4
COCO_VAL = "glipv2_synthetic_val"
LVIS_VAL = "glipv2_synthetic_lvis_val"
LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
MODEL_INPUT_KEYS = ("image", "height", "width")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    register_synthetic_shapes(root=tmp_path_factory.mktemp("synthetic"), num_train=12, num_val=NUM_VAL, num_heldout=2)
    register_synthetic_lvis("val")
    DatasetCatalog.get(LVIS_VAL)  # writes the LVIS json, which LVIS evaluators read when built
    yield
    register_synthetic_shapes()
    register_synthetic_lvis("val")


@pytest.fixture(scope="module")
def model(synthetic):
    torch.manual_seed(0)
    return GLIPv2Trainer.build_model(eval_cfg(COCO_VAL))


def eval_cfg(dataset: str, chunk_size: int = 0, fixed_ap: bool = False):
    cfg = tiny_cfg()
    cfg.DATASETS.TEST = (dataset,)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.MODEL.ATSS.DETECTIONS_PER_IMG = 300  # above TEST.DETECTIONS_PER_IMAGE (100), LVISEvaluator's cap
    cfg.TEST.PROMPT_CHUNK_SIZE = chunk_size
    cfg.TEST.LVIS_FIXED_AP = fixed_ap
    return cfg


class Recorder(DatasetEvaluator):
    """Hands everything to `inner` and keeps each (inputs, outputs) batch it was given."""

    def __init__(self, inner: DatasetEvaluator):
        self.inner = inner
        self.batches: list[tuple[list[dict], list[dict]]] = []

    def reset(self) -> None:
        self.batches = []
        self.inner.reset()

    def process(self, inputs, outputs) -> None:
        self.batches.append((inputs, outputs))
        self.inner.process(inputs, outputs)

    def evaluate(self):
        return self.inner.evaluate()


def run_test(cfg, model) -> tuple[dict, Recorder]:
    """GLIPv2Trainer.test with the evaluator its build_evaluator picks, recorded."""
    recorder = Recorder(GLIPv2Trainer.build_evaluator(cfg, cfg.DATASETS.TEST[0]))
    return GLIPv2Trainer.test(cfg, model, [recorder]), recorder


def replay(evaluator: DatasetEvaluator, batches) -> dict:
    """What inference_on_dataset does with an evaluator, on outputs computed before."""
    evaluator.reset()
    for inputs, outputs in batches:
        evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def instances_of(batches) -> list[Instances]:
    return [output["instances"] for _, outputs in batches for output in outputs]


def assert_finite(results: dict, metrics) -> None:
    assert all(math.isfinite(results["bbox"][m]) for m in metrics), results


def test_coco_ap(model):
    results, recorder = run_test(eval_cfg(COCO_VAL), model)
    assert isinstance(recorder.inner, COCOEvaluator)
    assert len(recorder.batches) == NUM_VAL and all(len(i) > 0 for i in instances_of(recorder.batches))
    assert_finite(results, ("AP", "AP50", "AP75"))  # COCOEvaluator gives NaN for no predictions


def test_lvis_ap_and_fixed_ap(model, tmp_path):
    cfg = eval_cfg(LVIS_VAL)
    standard, recorder = run_test(cfg, model)
    assert type(recorder.inner) is NumpyCompatibleLVISEvaluator
    assert_finite(standard, LVIS_METRICS)

    cfg.TEST.LVIS_FIXED_AP = True
    fixed = replay(GLIPv2Trainer.build_evaluator(cfg, LVIS_VAL), recorder.batches)
    assert_finite(fixed, LVIS_METRICS)

    # A per-category cut that binds for half the categories still keeps more per image than the cap.
    produced = Counter(int(c) + 1 for i in instances_of(recorder.batches) for c in i.pred_classes)
    k = int(np.median(list(produced.values())))
    assert max(produced.values()) > k
    replay(LVISFixedAPEvaluator(LVIS_VAL, topk_per_category=k, output_dir=str(tmp_path)), recorder.batches)
    kept = json.loads((tmp_path / "lvis_instances_results.json").read_text())
    assert Counter(d["category_id"] for d in kept) == {c: min(n, k) for c, n in produced.items()}
    assert max(Counter(d["image_id"] for d in kept).values()) > cfg.TEST.DETECTIONS_PER_IMAGE


def chunks_one_by_one(model, inputs: list[dict], names: list[str], chunk_size: int) -> list[Instances]:
    """Each slice of `names` as its own prompt through the bare model, one image at a time, merged
    per image with the slice's offset added to the labels."""
    merged = []
    model.eval()
    with torch.no_grad():
        for x in inputs:
            parts = []
            for start in range(0, len(names), chunk_size):
                (prompt,) = PromptBuilder(model.tokenizer).categories(names[start : start + chunk_size])
                output = model([{**{k: x[k] for k in MODEL_INPUT_KEYS}, "prompt": prompt}])[0]["instances"]
                output.pred_classes = output.pred_classes + start
                parts.append(output)
            merged.append(Instances.cat(parts))
    return merged


def fixed_ap_directly(image_ids: list[int], instances: list[Instances], k: int = 10_000) -> dict:
    """Fixed AP as Dave et al.'s reference script computes it, with lvis-api alone."""
    detections = [
        {"image_id": image_id, "category_id": int(c) + 1, "bbox": box.tolist(), "score": float(s)}
        for image_id, inst in zip(image_ids, instances)
        for box, c, s in zip(
            BoxMode.convert(inst.pred_boxes.tensor, BoxMode.XYXY_ABS, BoxMode.XYWH_ABS), inst.pred_classes, inst.scores
        )
    ]
    by_category = defaultdict(list)
    for index, detection in enumerate(detections):
        by_category[detection["category_id"]].append(index)
    kept = sorted(i for ids in by_category.values() for i in sorted(ids, key=lambda i: -detections[i]["score"])[:k])
    gt = LVIS(MetadataCatalog.get(LVIS_VAL).json_file)
    lvis_eval = LVISEval(gt, LVISResults(gt, [detections[i] for i in kept], max_dets=-1), "bbox")
    lvis_eval.params.max_dets = -1
    with lvis_numpy_float_alias():
        lvis_eval.run()
    return {m: float(lvis_eval.get_results()[m] * 100) for m in LVIS_METRICS}


def test_chunked_prompts_equal_one_prompt_per_chunk(model):
    names = list(MetadataCatalog.get(LVIS_VAL).thing_classes)
    chunk_size = 4
    assert len(PromptBuilder(model.tokenizer, chunk_size=chunk_size).categories(names)) == 3
    results, recorder = run_test(eval_cfg(LVIS_VAL, chunk_size=chunk_size, fixed_ap=True), model)
    assert type(recorder.inner) is LVISFixedAPEvaluator

    inputs = [x for batch, _ in recorder.batches for x in batch]
    evaluated = instances_of(recorder.batches)
    expected = chunks_one_by_one(model, inputs, names, chunk_size)
    for got, want in zip(evaluated, expected, strict=True):
        assert set(want.pred_classes.tolist()) - set(range(2 * chunk_size)), "the last chunk detected nothing"
        assert_same_detections(got, want)  # the chunks run batched, so rounding may swap near-tied scores
    assert results["bbox"] == pytest.approx(fixed_ap_directly([x["image_id"] for x in inputs], expected))
    assert results["bbox"]["AP50"] > 0  # the comparison is not between two zeros


def ground_truth_as_predictions(dicts: list[dict]) -> list[tuple[list[dict], list[dict]]]:
    """One batch per image whose detections are its ground-truth boxes, with distinct scores."""
    batches, score = [], 1.0
    for record in dicts:
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in record["annotations"]]
        instances = Instances((record["height"], record["width"]))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4))
        instances.pred_classes = torch.tensor([a["category_id"] for a in record["annotations"]], dtype=torch.int64)
        instances.scores = score - 0.001 * torch.arange(len(boxes), dtype=torch.float64)
        score -= 0.001 * len(boxes)
        batches.append(([record], [{"instances": instances}]))
    return batches


def test_fixed_ap_of_ground_truth(synthetic):
    dicts = DatasetCatalog.get(LVIS_VAL)
    batches = ground_truth_as_predictions(dicts)
    perfect = replay(LVISFixedAPEvaluator(LVIS_VAL), batches)["bbox"]
    assert perfect["AP"] == perfect["AP50"] == perfect["AP75"] == pytest.approx(100)

    # Keeping one detection per category, a category with n boxes reaches recall 1/n at precision 1:
    # its AP is the share of LVIS's 101 recall thresholds at or below 1/n.
    boxes_per_category = Counter(a["category_id"] for record in dicts for a in record["annotations"])
    thresholds = np.linspace(0.0, 1.0, 101)
    expected = np.mean([np.mean(thresholds <= 1.0 / n) for n in boxes_per_category.values()]) * 100
    assert max(boxes_per_category.values()) > 1, "every category has one box: the cut would not show"
    top_one = replay(LVISFixedAPEvaluator(LVIS_VAL, topk_per_category=1), batches)["bbox"]
    assert top_one["AP"] == pytest.approx(expected)


def test_lvis_numpy_alias_exists_only_inside_the_block():
    import lvis.eval

    numpy_module = lvis.eval.np
    assert not hasattr(numpy_module, "float")  # NumPy >= 1.24, as installed
    with lvis_numpy_float_alias():
        assert lvis.eval.np.float is float and lvis.eval.np.cumsum is np.cumsum
    assert lvis.eval.np is numpy_module
    with pytest.raises(KeyError), lvis_numpy_float_alias():
        raise KeyError("an evaluation that fails still restores the module")
    assert lvis.eval.np is numpy_module
