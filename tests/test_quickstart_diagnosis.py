"""glipv2_quickstart.diagnose: top labels, colour / shape accuracy and per-category AP of known detections."""

import math

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from torch import nn

from glipv2_d2.modeling.language import build_tokenizer
from glipv2_quickstart import register_synthetic_shapes
from glipv2_quickstart.diagnose import (
    ObjectOutcome,
    colour_and_shape,
    diagnose,
    format_report,
    main,
    match_objects,
    tally,
)

from .tiny_model import REPO, tiny_cfg

NAMES = ["red circle", "red square", "blue circle", "blue square"]
SPLITS = ("glipv2_synthetic_val", "glipv2_synthetic_heldout")


def detections(boxes, scores, classes, image_size=(100, 100)) -> Instances:
    result = Instances(image_size)
    result.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    result.scores = torch.tensor(scores, dtype=torch.float32)
    result.pred_classes = torch.tensor(classes, dtype=torch.int64)
    return result


def test_top_label_is_the_highest_scoring_detection_above_half_iou():
    gt_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]))
    found = detections(
        [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 20], [80, 80, 90, 90]],
        [0.6, 0.5, 0.95, 0.99],  # the 0.95 box has IoU exactly 0.5, the 0.99 one overlaps nothing
        [1, 0, 3, 2],
    )
    outcomes = match_objects(gt_boxes, torch.tensor([0, 2]), found)
    assert outcomes == [ObjectOutcome(0, 1, True), ObjectOutcome(2, None, False)]
    assert match_objects(gt_boxes, torch.tensor([0, 2]), detections([], [], [])) == [
        ObjectOutcome(0, None, False),
        ObjectOutcome(2, None, False),
    ]


def test_tally_counts_colour_shape_and_name_with_unmatched_objects_wrong():
    outcomes = [
        ObjectOutcome(0, 1, True),  # red circle called red square: colour right, shape wrong
        ObjectOutcome(0, 2, False),  # called blue circle: shape right, colour wrong
        ObjectOutcome(0, 0, True),
        ObjectOutcome(3, None, False),
    ]
    counts = tally(outcomes, NAMES)
    assert (counts.objects, counts.matched, counts.colour_right, counts.shape_right) == (4, 3, 2, 2)
    assert (counts.name_right, counts.own_name_detected) == (1, 2)
    assert counts.rate(counts.colour_right) == 0.5
    assert counts.top_labels == {"red square": 1, "blue circle": 1, "red circle": 1, "none": 1}


def test_category_names_must_be_colour_and_shape():
    assert colour_and_shape("yellow triangle") == ("yellow", "triangle")
    with pytest.raises(ValueError, match="'dog'"):
        colour_and_shape("dog")


def wrong_label(name: str) -> str | None:
    """The stub's mistake for an object: blue shapes get the next shape, other triangles the next colour."""
    colour, shape = colour_and_shape(name)
    shapes = ["circle", "square", "triangle"]
    colours = ["red", "green", "blue", "yellow"]
    if colour == "blue":
        return f"blue {shapes[(shapes.index(shape) + 1) % 3]}"
    if shape == "triangle":
        return f"{colours[(colours.index(colour) + 1) % 4]} triangle"
    return None


class StubDetector(nn.Module):
    """Returns every ground-truth box of a split's image: right-named at 0.9, or wrong-named
    (wrong_label) at 0.9 with the right name at 0.6 on the same box."""

    def __init__(self, cfg, split: str):
        super().__init__()
        self.tokenizer = build_tokenizer(cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER)
        self.class_names = MetadataCatalog.get(split).thing_classes
        self.annotations = {r["image_id"]: r["annotations"] for r in DatasetCatalog.get(split)}

    def finish_instances(self, instances):
        return instances

    def inference_over_prompts(self, batched_inputs: list[dict], prompts) -> list[list]:
        return [[self._detections({**x, "prompt": prompt}) for prompt in prompts] for x in batched_inputs]

    def _detections(self, x: dict):
        assert x["prompt"].label_names == dict(enumerate(self.class_names))
        boxes, scores, classes = [], [], []
        for a in self.annotations[x["image_id"]]:
            box = BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            wrong = wrong_label(self.class_names[a["category_id"]])
            if wrong is not None:
                boxes.append(box)
                scores.append(0.9)
                classes.append(self.class_names.index(wrong))
            boxes.append(box)
            scores.append(0.6 if wrong else 0.9)
            classes.append(a["category_id"])
        return detections(boxes, scores, classes, (x["height"], x["width"]))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    register_synthetic_shapes(root=tmp_path_factory.mktemp("synthetic"), num_train=2, num_val=3, num_heldout=3)
    yield
    register_synthetic_shapes()


@pytest.mark.usefixtures("synthetic", "single_thread")
@pytest.mark.parametrize("split", SPLITS)
def test_diagnosis_of_known_detections(split):
    cfg = tiny_cfg()
    cfg.DATASETS.TEST = (split,)
    cfg.DATALOADER.NUM_WORKERS = 0
    (result,) = diagnose(cfg, StubDetector(cfg, split))

    gt = [result.class_names[a["category_id"]] for r in DatasetCatalog.get(split) for a in r["annotations"]]
    blue = sum(name.startswith("blue") for name in gt)
    other_triangles = sum(name.endswith("triangle") and not name.startswith("blue") for name in gt)
    counts = tally(result.outcomes, result.class_names)
    assert counts.objects == counts.matched == counts.own_name_detected == len(gt) > 0
    assert counts.colour_right == len(gt) - other_triangles
    assert counts.shape_right == len(gt) - blue
    assert counts.name_right == len(gt) - blue - other_triangles
    for name in set(gt):  # no category named wrongly on another object: every detection of it is right
        if wrong_label(name) is None:
            assert result.bbox[f"AP-{name}"] == pytest.approx(100.0)
    if split == "glipv2_synthetic_heldout":
        assert [result.class_names[c] for c in result.heldout_classes] == ["blue circle", "yellow triangle"]
        assert "Held-out pairs: mean AP" in format_report(result)
    assert not math.isnan(result.bbox["AP"])


def test_command_without_weights_names_model_weights(capsys):
    with pytest.raises(SystemExit):
        main(["--config-file", str(REPO / "configs" / "quickstart" / "train.yaml")])
    assert "MODEL.WEIGHTS is empty" in capsys.readouterr().err
