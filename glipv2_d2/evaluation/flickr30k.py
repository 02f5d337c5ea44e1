"""Flickr30K Entities phrase grounding: Recall@k under MDETR's protocol, which GLIP and GLIPv2 report.

For every phrase that has ground-truth boxes, the predictions labelled with that phrase are ranked by
score; the phrase is recalled at k when one of its k best predictions overlaps the ground truth with
IoU >= 0.5. Recall is the fraction of recalled phrases over the whole split ("all") and over each
Flickr30K Entities phrase type. Two ground-truth protocols exist:

- any box (MDETR's default, GLIP's FLICKR_GT_TYPE "separate"): a prediction matches when it overlaps
  any single box of the phrase;
- merged boxes: the boxes of the phrase are replaced by their one enclosing box.

The ground truth is read from the evaluated inputs themselves (their "phrases" and "annotations" in
original image pixels), so no annotation file is needed and every process scores its own images.
"""

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode, Instances
from torchvision.ops import box_iou

from .per_image_records import check_each_image_once, gather_per_image

__all__ = [
    "Flickr30kGroundingEvaluator",
    "PhraseOutcome",
    "first_match_ranks",
    "image_phrase_outcomes",
    "recall_at_k",
]

logger = logging.getLogger(__name__)

UPPER_BOUND = -1  # a topk entry meaning "all predictions": whether the right box was proposed at all
DEFAULT_PHRASE_TYPE = "other"
NO_MATCH = -1  # rank given by first_match_ranks to a phrase none of whose predictions matches


@dataclass(frozen=True)
class PhraseOutcome:
    """What the split's recall needs to know about one evaluated phrase; small, so cheap to gather."""

    phrase_types: tuple[str, ...]
    first_match_rank: int | None  # 0-based rank (by score) of its best-ranked matching prediction


def _describe(image_id: Hashable) -> str:
    return f"Flickr30K evaluation, image_id {image_id!r}"


def _phrase_types(phrase: dict, image_id: Hashable, index: int) -> tuple[str, ...]:
    """The types a phrase counts under. Flickr30K Entities gives some phrases several and MDETR counts
    such a phrase once under each, so the full list "phrase_types" (as the MDETR-format loader
    writes it) wins over the single "phrase_type"; with neither the phrase is "other"."""
    key = "phrase_types" if "phrase_types" in phrase else "phrase_type"
    types = phrase.get(key)
    if types is None:
        return (DEFAULT_PHRASE_TYPE,)
    if isinstance(types, str):
        return (types,)
    if isinstance(types, (list, tuple)) and all(isinstance(t, str) for t in types):
        return tuple(types)
    raise ValueError(f"{_describe(image_id)}: phrases[{index}][{key!r}] must be a string or strings, got {types!r}")


def _required(record: dict, key: str, where: str) -> object:
    if key not in record:
        raise KeyError(f"{where}: missing {key!r}")
    return record[key]


def _ground_truth(input_dict: dict) -> tuple[list[dict], list[dict]]:
    """The input's phrases and box annotations, with an error that says how they were lost."""
    where = _describe(input_dict.get("image_id"))
    for key in ("phrases", "annotations"):
        if key not in input_dict:
            raise KeyError(
                f"{where}: the input has no {key!r}; the test mapper must keep the dataset dict's "
                "'phrases' and 'annotations' (Detectron2's DatasetMapper drops annotations when is_train=False)"
            )
    return input_dict["phrases"], input_dict["annotations"]


def _annotation_boxes(annotations: list[dict], image_id: Hashable) -> torch.Tensor:
    """(M, 4) XYXY boxes in float64, as MDETR compares its integer boxes with float predictions."""
    boxes = []
    for index, annotation in enumerate(annotations):
        where = f"{_describe(image_id)}, annotations[{index}]"
        bbox = _required(annotation, "bbox", where)
        mode = _required(annotation, "bbox_mode", where)
        boxes.append(BoxMode.convert(list(bbox), mode, BoxMode.XYXY_ABS))
    return torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)


def _phrase_box_membership(phrases: list[dict], annotations: list[dict], image_id: Hashable) -> torch.Tensor:
    """(Q, M) bool: box m belongs to phrase q. Phrases may share a phrase_id (coreferent mentions of
    one Flickr30K entity in a sentence); each is then evaluated against the entity's boxes."""
    phrase_ids = [_required(p, "phrase_id", f"{_describe(image_id)}, phrases[{q}]") for q, p in enumerate(phrases)]
    known_ids = set(phrase_ids)
    box_phrase_ids = []
    for index, annotation in enumerate(annotations):
        where = f"{_describe(image_id)}, annotations[{index}]"
        ids = _required(annotation, "phrase_ids", where)
        unknown = [i for i in ids if i not in known_ids]
        if unknown:
            raise ValueError(f"{where}: phrase_ids {unknown} are not in the input's phrases (ids {sorted(known_ids)})")
        box_phrase_ids.append(set(ids))
    membership = [[pid in ids for ids in box_phrase_ids] for pid in phrase_ids]
    return torch.tensor(membership, dtype=torch.bool).reshape(len(phrases), len(annotations))


def _enclosing_boxes(boxes: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """(Q, 4) the smallest box enclosing each phrase's boxes (MDETR's merged-boxes ground truth)."""
    member = membership[:, :, None]
    top_left = torch.where(member, boxes[None, :, :2], torch.inf).amin(dim=1)
    bottom_right = torch.where(member, boxes[None, :, 2:], -torch.inf).amax(dim=1)
    return torch.cat([top_left, bottom_right], dim=1)


def _phrase_ious(
    pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, membership: torch.Tensor, merge_boxes: bool
) -> torch.Tensor:
    """(N, Q) IoU of each prediction with each phrase's ground truth: with its enclosing box when
    merging, else with its best-overlapping box (a match with any box is a match)."""
    if merge_boxes:
        return box_iou(pred_boxes, _enclosing_boxes(gt_boxes, membership))
    ious = box_iou(pred_boxes, gt_boxes)  # (N, M), torchvision's convention: no "+1" on widths
    return torch.where(membership[None], ious[:, None, :], -1.0).amax(dim=2)


def first_match_ranks(scores: torch.Tensor, pred_classes: torch.Tensor, matches: torch.Tensor) -> torch.Tensor:
    """(Q,) for each phrase, the 0-based rank among that phrase's predictions (by descending score,
    ties kept in output order) of its first prediction with matches[n, q] True, or NO_MATCH.

    A phrase recalled at k is then simply one with 0 <= rank < k, for every k at once.
    """
    num_phrases = matches.shape[1]
    if len(scores) == 0:
        return torch.full((num_phrases,), NO_MATCH, dtype=torch.long)
    order = torch.sort(scores, descending=True, stable=True).indices
    own_phrase = pred_classes[order, None] == torch.arange(num_phrases)  # (N, Q)
    rank_in_phrase = own_phrase.long().cumsum(dim=0) - 1
    hit = own_phrase & matches[order]
    beyond_last = len(scores)
    first = torch.where(hit, rank_in_phrase, beyond_last).amin(dim=0)
    return torch.where(first == beyond_last, NO_MATCH, first)


def _check_pred_classes(pred_classes: torch.Tensor, num_phrases: int, image_id: Hashable) -> None:
    outside = pred_classes[(pred_classes < 0) | (pred_classes >= num_phrases)]
    if len(outside):
        raise ValueError(
            f"{_describe(image_id)}: pred_classes {sorted(set(outside.tolist()))} are not indices of the "
            f"input's {num_phrases} phrases (a grounding label is the phrase's position in 'phrases')"
        )


def image_phrase_outcomes(
    input_dict: dict, instances: Instances, merge_boxes: bool = False, iou_threshold: float = 0.5
) -> list[PhraseOutcome]:
    """The outcome of each phrase of one image-sentence input that has ground-truth boxes; phrases
    without boxes (Flickr30K's "notvisual" and box-less entities) are skipped, as MDETR does."""
    image_id = input_dict.get("image_id")
    phrases, annotations = _ground_truth(input_dict)
    membership = _phrase_box_membership(phrases, annotations, image_id)
    gt_boxes = _annotation_boxes(annotations, image_id)
    pred_classes = instances.pred_classes.long()
    _check_pred_classes(pred_classes, len(phrases), image_id)
    evaluated = membership.any(dim=1)
    if not evaluated.any():
        return []
    pred_boxes = instances.pred_boxes.tensor.to(torch.float64)
    matches = _phrase_ious(pred_boxes, gt_boxes, membership, merge_boxes) >= iou_threshold
    ranks = first_match_ranks(instances.scores, pred_classes, matches)
    return [
        PhraseOutcome(_phrase_types(phrase, image_id, q), None if ranks[q] == NO_MATCH else int(ranks[q]))
        for q, phrase in enumerate(phrases)
        if evaluated[q]
    ]


def _recalled(outcome: PhraseOutcome, k: int) -> bool:
    if outcome.first_match_rank is None:
        return False
    return k == UPPER_BOUND or outcome.first_match_rank < k


def _metric_name(k: int) -> str:
    return "R@upper_bound" if k == UPPER_BOUND else f"R@{k}"


def recall_at_k(outcomes: Sequence[PhraseOutcome], topk: Sequence[int]) -> dict[str, float]:
    """Recall in percent over all phrases ("R@k"), then per phrase type ("R@k/<type>"): micro
    averages, every phrase weighing the same, as MDETR's RecallTracker counts them."""
    groups: dict[str, list[PhraseOutcome]] = {"": list(outcomes)}
    for outcome in outcomes:
        for phrase_type in outcome.phrase_types:
            groups.setdefault(f"/{phrase_type}", []).append(outcome)
    results = {}
    for suffix in sorted(groups):
        members = groups[suffix]
        for k in topk:
            recalled = sum(_recalled(outcome, k) for outcome in members)
            results[_metric_name(k) + suffix] = 100.0 * recalled / len(members)
    return results


def _validated_topk(topk: Sequence[int]) -> tuple[int, ...]:
    topk = tuple(topk)
    if not topk or len(set(topk)) != len(topk) or any(k != UPPER_BOUND and k < 1 for k in topk):
        raise ValueError(f"topk must be distinct positive integers (or {UPPER_BOUND} for all predictions), got {topk}")
    return topk


class Flickr30kGroundingEvaluator(DatasetEvaluator):
    """Recall@k of phrase grounding on Flickr30K Entities (MDETR's protocol), as a Detectron2 evaluator.

    Each input is one image-sentence pair: "image_id" (unique over the split), "phrases" and
    "annotations" (boxes in original pixels with their "phrase_ids"). Each output's Instances carry
    pred_boxes (original pixels, XYXY), scores and pred_classes = index into the input's "phrases".
    One evaluator reports one protocol (merge_boxes), like MDETR's and GLIP's runs; the results are
    {"grounding": {"R@1": ..., "R@1/people": ...}} in percent.
    """

    def __init__(
        self,
        merge_boxes: bool = False,
        topk: Sequence[int] = (1, 5, 10),
        iou_threshold: float = 0.5,
        distributed: bool = True,
    ):
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self._merge_boxes = merge_boxes
        self._topk = _validated_topk(topk)
        self._iou_threshold = iou_threshold
        self._distributed = distributed
        self._per_image: list[tuple[Hashable, list[PhraseOutcome]]] = []

    def reset(self) -> None:
        self._per_image = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        for input_dict, output in zip(inputs, outputs):
            where = _describe(input_dict.get("image_id"))
            image_id = _required(input_dict, "image_id", where)
            instances = _required(output, "instances", f"{where}, model output").to("cpu")
            outcomes = image_phrase_outcomes(input_dict, instances, self._merge_boxes, self._iou_threshold)
            self._per_image.append((image_id, outcomes))

    def evaluate(self) -> dict:
        per_image = gather_per_image(self._per_image, self._distributed)
        if per_image is None:
            return {}
        check_each_image_once(per_image, "Flickr30K evaluation", "image-sentence pair")
        outcomes = [outcome for _, image_outcomes in per_image for outcome in image_outcomes]
        if not outcomes:
            logger.warning("Flickr30K evaluation: no phrase with ground-truth boxes was evaluated")
            return {}
        protocol = "merged boxes" if self._merge_boxes else "any box"
        logger.info(f"Flickr30K grounding ({protocol}): {len(outcomes)} phrases in {len(per_image)} image-sentences")
        return {"grounding": recall_at_k(outcomes, self._topk)}
