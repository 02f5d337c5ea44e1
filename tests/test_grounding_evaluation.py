"""GLIPv2Trainer.test on phrase-grounding sets: each image's own caption, phrase labels, Recall@k."""

import math

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from torch import nn

from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_d2.evaluation import Flickr30kGroundingEvaluator
from glipv2_quickstart import register_synthetic_grounding, register_synthetic_shapes

from .tiny_model import tiny_cfg

# the first images of glipv2_synthetic_grounding_val whose phrases each have one box, so that
# ground-truth predictions are perfect under both protocols (multi-box phrases: test_flickr30k_evaluator)
SUBSET = "glipv2_test_grounding_val_subset"
MERGED = "glipv2_test_grounding_val_merged"  # the same images, marked as merged-boxes ground truth
NUM_IMAGES = 3
RECALLS = ("R@1", "R@5", "R@10")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", autouse=True)
def grounding_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    register_synthetic_shapes(root=root, num_train=2, num_val=12, num_heldout=1)
    register_synthetic_grounding(root=root, num_train=2, num_val=12, num_heldout=1)
    records = [r for r in DatasetCatalog.get("glipv2_synthetic_grounding_val") if _one_box_per_phrase(r)]
    assert len(records) >= NUM_IMAGES
    for name, gt_type in ((SUBSET, "separate"), (MERGED, "merged")):
        DatasetCatalog.register(name, lambda: records[:NUM_IMAGES])
        MetadataCatalog.get(name).set(evaluator_type="flickr30k", gt_type=gt_type)
    yield {record["image_id"]: record for record in records[:NUM_IMAGES]}
    for name in (SUBSET, MERGED):
        DatasetCatalog.pop(name)
        MetadataCatalog.pop(name)
    register_synthetic_shapes()
    register_synthetic_grounding()


def _one_box_per_phrase(record: dict) -> bool:
    phrase_ids = [p for anno in record["annotations"] for p in anno["phrase_ids"]]
    return len(phrase_ids) == len(set(phrase_ids))


def eval_cfg(*datasets: str):
    cfg = tiny_cfg()
    cfg.DATASETS.TEST = datasets
    cfg.DATALOADER.NUM_WORKERS = 0
    return cfg


class GroundTruthModel(nn.Module):
    """Predicts, for every phrase the model is given a label for, its ground-truth boxes (score 1)."""

    def __init__(self):
        super().__init__()
        self.inputs: list[dict] = []

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        self.inputs += batched_inputs
        return [{"instances": self._predictions(x)} for x in batched_inputs]

    @staticmethod
    def _predictions(x: dict) -> Instances:
        boxes, classes = [], []
        for anno in x["annotations"]:
            box = BoxMode.convert(anno["bbox"], anno["bbox_mode"], BoxMode.XYXY_ABS)
            for phrase in anno["phrase_ids"]:
                if phrase in x["prompt"].label_to_tokens:
                    boxes.append(box)
                    classes.append(phrase)
        return Instances(
            (x["height"], x["width"]),
            pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
            scores=torch.ones(len(boxes)),
            pred_classes=torch.tensor(classes, dtype=torch.long),
        )


class Recorder(DatasetEvaluator):
    """Hands everything to `inner` and keeps the outputs it was given."""

    def __init__(self, inner: DatasetEvaluator):
        self.inner = inner
        self.outputs: list[tuple[dict, dict]] = []

    def reset(self) -> None:
        self.outputs = []
        self.inner.reset()

    def process(self, inputs, outputs) -> None:
        self.outputs += list(zip(inputs, outputs))
        self.inner.process(inputs, outputs)

    def evaluate(self):
        return self.inner.evaluate()


def test_ground_truth_predictions_recall_every_phrase(grounding_val):
    model = GroundTruthModel()
    results = GLIPv2Trainer.test(eval_cfg(SUBSET), model)
    assert {results["grounding"][k] for k in RECALLS} == {100.0}
    assert sorted(x["image_id"] for x in model.inputs) == sorted(grounding_val)
    for x in model.inputs:  # the image's own sentence and phrase labels, not a vocabulary prompt
        record = grounding_val[x["image_id"]]
        assert x["prompt"].caption == record["caption"]
        assert sorted(x["prompt"].label_to_tokens) == list(range(len(record["phrases"])))


def test_several_grounding_sets_report_per_dataset():
    results = GLIPv2Trainer.test(eval_cfg(SUBSET, MERGED), GroundTruthModel())
    assert sorted(results) == sorted([SUBSET, MERGED])
    assert all(results[name]["grounding"]["R@1"] == 100.0 for name in (SUBSET, MERGED))


def _two_box_phrase() -> tuple[dict, dict]:
    """One phrase with two distant boxes; the prediction is the box enclosing both."""
    annotations = [
        {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "phrase_ids": [0]} for box in ([0, 0, 10, 10], [90, 90, 100, 100])
    ]
    inputs = {"image_id": 1, "phrases": [{"phrase_id": 0}], "annotations": annotations}
    prediction = Instances(
        (100, 100),
        pred_boxes=Boxes(torch.tensor([[0.0, 0.0, 100.0, 100.0]])),
        scores=torch.ones(1),
        pred_classes=torch.zeros(1, dtype=torch.long),
    )
    return inputs, {"instances": prediction}


@pytest.mark.parametrize(("dataset", "recall"), [(SUBSET, 0.0), (MERGED, 100.0)])
def test_evaluator_protocol_follows_the_gt_type(dataset, recall):
    evaluator = GLIPv2Trainer.build_evaluator(eval_cfg(dataset), dataset)
    assert isinstance(evaluator, Flickr30kGroundingEvaluator)
    inputs, output = _two_box_phrase()
    evaluator.reset()
    evaluator.process([inputs], [output])
    assert evaluator.evaluate()["grounding"]["R@1"] == recall


def test_tiny_model_recall(grounding_val):
    cfg = eval_cfg(SUBSET)
    torch.manual_seed(0)
    model = GLIPv2Trainer.build_model(cfg)
    recorder = Recorder(GLIPv2Trainer.build_evaluator(cfg, SUBSET))
    results = GLIPv2Trainer.test(cfg, model, [recorder])
    recalls = results["grounding"]
    assert set(RECALLS) <= set(recalls)
    assert all(math.isfinite(recalls[k]) and 0.0 <= recalls[k] <= 100.0 for k in RECALLS)
    assert recalls["R@1"] <= recalls["R@5"] <= recalls["R@10"]
    assert len(recorder.outputs) == NUM_IMAGES
    for x, output in recorder.outputs:
        classes = output["instances"].pred_classes
        assert len(classes) > 0 and set(classes.tolist()) <= set(x["prompt"].label_to_tokens)
