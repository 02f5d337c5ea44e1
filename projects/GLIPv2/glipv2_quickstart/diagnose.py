"""What the quick-start model calls each object: per-category AP and per-object colour / shape naming.

AP over all 12 categories hides what a reader of "held-out colour-shape pairs" asks: is a blue
circle called "blue circle"? So, on every test split, through the trainer's own test path
(GLIPv2Trainer.test, COCOEvaluator beside a naming evaluator), this reports the AP of every
category and, for every ground-truth object, the label of the highest-scoring detection that
overlaps it with IoU > 0.5 ("top label"): whether its colour word and its shape word are right.

    python -m glipv2_quickstart.diagnose --config-file configs/quickstart/train.yaml \
        MODEL.WEIGHTS output/quickstart/model_final.pth
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators
from detectron2.structures import Boxes, BoxMode, Instances, pairwise_iou
from detectron2.utils.logger import setup_logger
from torch import nn

from glipv2_d2.checkpoint import GLIPv2Checkpointer
from glipv2_d2.config import setup_cfg
from glipv2_d2.engine.trainer import GLIPv2Trainer

from . import register_quickstart_datasets

__all__ = [
    "MATCH_IOU",
    "NamingEvaluator",
    "NamingTally",
    "ObjectOutcome",
    "SplitDiagnosis",
    "colour_and_shape",
    "diagnose",
    "format_report",
    "match_objects",
    "tally",
]

MATCH_IOU = 0.5  # a detection describes an object when their IoU is above this


@dataclass(frozen=True)
class ObjectOutcome:
    """How the detections describe one ground-truth object."""

    true_class: int
    top_class: int | None  # label of the highest-scoring detection with IoU > MATCH_IOU; None if none
    own_name_detected: bool  # some detection with IoU > MATCH_IOU carries the object's own label


@dataclass(frozen=True)
class NamingTally:
    """Counts over a set of objects; an object without an overlapping detection counts as wrong."""

    objects: int
    matched: int
    colour_right: int
    shape_right: int
    name_right: int
    own_name_detected: int
    top_labels: Counter  # top label name ("none" when unmatched) -> objects

    def rate(self, count: int) -> float:
        return count / self.objects if self.objects else math.nan


@dataclass
class SplitDiagnosis:
    """One test split: COCOEvaluator's bbox results and the per-object outcomes."""

    dataset_name: str
    class_names: list[str]
    heldout_classes: list[int]
    bbox: dict[str, float]
    outcomes: list[ObjectOutcome]


def colour_and_shape(name: str) -> tuple[str, str]:
    """The colour and shape words of a quick-start category name such as "blue circle"."""
    words = name.split()
    if len(words) != 2:
        raise ValueError(f"category name {name!r} is not '<colour> <shape>'")
    return words[0], words[1]


def match_objects(gt_boxes: Boxes, gt_classes: torch.Tensor, detections: Instances) -> list[ObjectOutcome]:
    """Each object's top label: the class of the highest-scoring detection with IoU > MATCH_IOU."""
    if len(detections) == 0:
        return [ObjectOutcome(int(c), None, False) for c in gt_classes]
    overlapping = pairwise_iou(gt_boxes, detections.pred_boxes) > MATCH_IOU
    scores = torch.where(overlapping, detections.scores[None, :], torch.tensor(-math.inf))
    best = scores.argmax(dim=1)
    outcomes = []
    for index, true_class in enumerate(gt_classes.tolist()):
        hits = overlapping[index]
        top = int(detections.pred_classes[best[index]]) if hits.any() else None
        own = bool((detections.pred_classes[hits] == true_class).any())
        outcomes.append(ObjectOutcome(true_class, top, own))
    return outcomes


def tally(outcomes: Sequence[ObjectOutcome], class_names: Sequence[str]) -> NamingTally:
    """Colour, shape and full-name accuracy of the top labels of `outcomes`."""
    words = [colour_and_shape(name) for name in class_names]
    matched = [o for o in outcomes if o.top_class is not None]
    return NamingTally(
        objects=len(outcomes),
        matched=len(matched),
        colour_right=sum(words[o.top_class][0] == words[o.true_class][0] for o in matched),
        shape_right=sum(words[o.top_class][1] == words[o.true_class][1] for o in matched),
        name_right=sum(o.top_class == o.true_class for o in matched),
        own_name_detected=sum(o.own_name_detected for o in outcomes),
        top_labels=Counter("none" if o.top_class is None else class_names[o.top_class] for o in outcomes),
    )


class NamingEvaluator(DatasetEvaluator):
    """Collects an ObjectOutcome for every ground-truth object of `dataset_name` (one process)."""

    def __init__(self, dataset_name: str):
        self.class_names = list(MetadataCatalog.get(dataset_name).thing_classes)
        for name in self.class_names:
            colour_and_shape(name)
        self.ground_truth = {record["image_id"]: _ground_truth(record) for record in DatasetCatalog.get(dataset_name)}
        self.outcomes: list[ObjectOutcome] = []

    def reset(self) -> None:
        self.outcomes = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for image, output in zip(inputs, outputs):
            gt_boxes, gt_classes = self.ground_truth[image["image_id"]]
            self.outcomes.extend(match_objects(gt_boxes, gt_classes, output["instances"].to("cpu")))

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Rates over all objects, in print_csv_format's task -> {metric: value} shape."""
        counts = tally(self.outcomes, self.class_names)
        return {
            "naming": {
                key: counts.rate(getattr(counts, key))
                for key in ("matched", "colour_right", "shape_right", "name_right", "own_name_detected")
            }
        }


def _ground_truth(record: dict) -> tuple[Boxes, torch.Tensor]:
    """XYXY boxes and contiguous classes of a dataset dict's non-crowd annotations."""
    annotations = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
    return (
        Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
        torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
    )


def _heldout_classes(dataset_name: str) -> list[int]:
    metadata = MetadataCatalog.get(dataset_name)
    to_contiguous = metadata.thing_dataset_id_to_contiguous_id
    return [to_contiguous[i] for i in metadata.get("heldout_category_ids", [])]


def diagnose(cfg: CfgNode, model: nn.Module) -> list[SplitDiagnosis]:
    """Evaluate `model` on every set of cfg.DATASETS.TEST with GLIPv2Trainer.test."""
    names = list(cfg.DATASETS.TEST)
    naming = [NamingEvaluator(name) for name in names]
    evaluators = [DatasetEvaluators([GLIPv2Trainer.build_evaluator(cfg, n), e]) for n, e in zip(names, naming)]
    results = GLIPv2Trainer.test(cfg, model, evaluators)
    if len(names) == 1:
        results = {names[0]: results}
    return [
        SplitDiagnosis(name, e.class_names, _heldout_classes(name), results[name]["bbox"], e.outcomes)
        for name, e in zip(names, naming)
    ]


def _fraction(count: int, total: int) -> str:
    return f"{count}/{total} ({count / total:.2f})" if total else "0/0"


def _top_labels(counts: NamingTally) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.top_labels.most_common(3))


def format_report(split: SplitDiagnosis) -> str:
    """Markdown: the split's AP, its naming accuracies and one table row per category with objects."""
    everything = tally(split.outcomes, split.class_names)
    lines = [
        f"### {split.dataset_name}: {everything.objects} objects",
        "",
        f"bbox AP {split.bbox['AP']:.1f} (AP50 {split.bbox['AP50']:.1f}), over all categories.",
        f"Top label (highest-scoring detection with IoU > {MATCH_IOU}) of every object, an object "
        f"without one counting as wrong: found {_fraction(everything.matched, everything.objects)}, "
        f"colour right {_fraction(everything.colour_right, everything.objects)}, "
        f"shape right {_fraction(everything.shape_right, everything.objects)}, "
        f"name right {_fraction(everything.name_right, everything.objects)}.",
    ]
    heldout_ap = [split.bbox.get(f"AP-{split.class_names[c]}", math.nan) for c in split.heldout_classes]
    heldout_ap = [ap for ap in heldout_ap if not math.isnan(ap)]
    if heldout_ap:
        lines.append(f"Held-out pairs: mean AP {sum(heldout_ap) / len(heldout_ap):.1f}.")
    lines += [
        "",
        "| category | objects | AP | top label right | own name among its detections | top labels |",
        "|---|---|---|---|---|---|",
    ]
    for index, name in enumerate(split.class_names):
        counts = tally([o for o in split.outcomes if o.true_class == index], split.class_names)
        if counts.objects == 0:
            continue
        marker = " (held out)" if index in split.heldout_classes else ""
        lines.append(
            f"| {name}{marker} | {counts.objects} | {split.bbox.get(f'AP-{name}', math.nan):.1f} | "
            f"{_fraction(counts.name_right, counts.objects)} | "
            f"{_fraction(counts.own_name_detected, counts.objects)} | {_top_labels(counts)} |"
        )
    return "\n".join(lines)


def _load_model(cfg: CfgNode) -> nn.Module:
    """The model as the launcher's --eval-only loads it, so the numbers are those of its evaluation."""
    model = GLIPv2Trainer.build_model(cfg)
    GLIPv2Checkpointer(model, trust_pickle=cfg.MODEL.TRUST_PICKLED_WEIGHTS).load(cfg.MODEL.WEIGHTS)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    """Print the report of every set of the config's DATASETS.TEST."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="e.g. configs/quickstart/train.yaml")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS <file>")
    args = parser.parse_args(argv)
    cfg = setup_cfg(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        parser.error("MODEL.WEIGHTS is empty: pass the trained model, e.g. MODEL.WEIGHTS <OUTPUT_DIR>/model_final.pth")
    setup_logger()
    register_quickstart_datasets()
    for split in diagnose(cfg, _load_model(cfg)):
        print(format_report(split), end="\n\n")


if __name__ == "__main__":
    main()
