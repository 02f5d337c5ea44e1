"""The synthetic shapes as referring-segmentation data: the quick start's PhraseCut.

Each record is one phrase about one scene of the train or val split ("the red circle", "the blue
squares", "the red circle left of the square") and its targets are every object the phrase refers
to, in the PhraseCut loader's format (glipv2_d2/data/datasets/phrasecut.py): caption = the phrase,
annotations = the referred objects with box and polygon mask (category 0, "object"), one span over
the whole phrase. No new images are drawn.

Relations are read off the drawn geometry with a margin, so that every phrase is true and exact:
A is "left of" B when A's box ends before B's begins, and clearly not when A's centre is right of
B's; a relational phrase is only written when every object of its description is clearly one or
the other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from glipv2_d2.data.datasets import load_grounding_coco_json, unregister_dataset
from glipv2_d2.data.datasets.phrasecut import PHRASECUT_EVALUATOR_TYPE

from .scene_text import plural
from .shapes import ALL_PAIRS, default_synthetic_root, generate_synthetic_shapes

__all__ = [
    "RELATIONS",
    "ReferringExpression",
    "ShapeInScene",
    "referring_expressions",
    "referring_records",
    "register_synthetic_referring",
    "relation_holds",
]

RELATIONS = ("left of", "right of", "above", "below")
REFERRING_SPLITS = ("train", "val")

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
Description = tuple[str, ...]  # (colour, shape) or (shape,)


@dataclass(frozen=True)
class ShapeInScene:
    """What a phrase may say about one drawn object."""

    colour: str
    shape: str
    box: Box


@dataclass(frozen=True)
class ReferringExpression:
    """A phrase and the indices of every object it refers to."""

    phrase: str
    targets: tuple[int, ...]
    relational: bool


def relation_holds(a: Box, b: Box, relation: str) -> bool | None:
    """True when box `a` lies entirely on `relation`'s side of box `b`, False when a's centre is not
    on that side of b's centre, None in between (a phrase would be ambiguous)."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a, b
    a_centre, b_centre = ((ax0 + ax1) / 2, (ay0 + ay1) / 2), ((bx0 + bx1) / 2, (by0 + by1) / 2)
    sides = {
        "left of": (ax1 <= bx0, a_centre[0] >= b_centre[0]),
        "right of": (ax0 >= bx1, a_centre[0] <= b_centre[0]),
        "above": (ay1 <= by0, a_centre[1] >= b_centre[1]),
        "below": (ay0 >= by1, a_centre[1] <= b_centre[1]),
    }
    if relation not in sides:
        raise ValueError(f"unknown relation {relation!r}; use one of {RELATIONS}")
    entirely, clearly_not = sides[relation]
    if entirely:
        return True
    return False if clearly_not else None


def _noun(description: Description, count: int) -> str:
    *colour, shape = description
    return " ".join([*colour, shape if count == 1 else plural(shape)])


def _descriptions(objects: Sequence[ShapeInScene]) -> dict[Description, list[int]]:
    """Every (colour, shape) and every shape in the scene -> the objects it describes."""
    matches: dict[Description, list[int]] = {}
    for i, obj in enumerate(objects):
        matches.setdefault((obj.colour, obj.shape), []).append(i)
    for i, obj in enumerate(objects):
        matches.setdefault((obj.shape,), []).append(i)
    return matches


def _landmarks(matches: dict[Description, list[int]]) -> dict[int, Description]:
    """Objects a phrase can name alone ("the square"): the shortest description matching only them."""
    landmarks: dict[int, Description] = {}
    for description, indices in sorted(matches.items(), key=lambda item: len(item[0])):
        if len(indices) == 1:
            landmarks.setdefault(indices[0], description)
    return landmarks


def referring_expressions(objects: Sequence[ShapeInScene]) -> list[ReferringExpression]:
    """Every true, exact phrase about the scene: a description's objects ("the red circle", "the blue
    squares"), and those of them on one side of a uniquely named other object ("the red circle left
    of the square")."""
    matches = _descriptions(objects)
    expressions = [
        ReferringExpression(f"the {_noun(description, len(indices))}", tuple(indices), relational=False)
        for description, indices in matches.items()
    ]
    for landmark, landmark_description in _landmarks(matches).items():
        for description, indices in matches.items():
            if landmark in indices:
                continue
            for relation in RELATIONS:
                holds = [relation_holds(objects[i].box, objects[landmark].box, relation) for i in indices]
                targets = tuple(i for i, h in zip(indices, holds) if h)
                if targets and None not in holds:
                    phrase = f"the {_noun(description, len(targets))} {relation} the {_noun(landmark_description, 1)}"
                    expressions.append(ReferringExpression(phrase, targets, relational=True))
    return expressions


def _pick(
    expressions: list[ReferringExpression], per_image: int, rng: np.random.Generator
) -> list[ReferringExpression]:
    """Up to `per_image` phrases with different targets ("the square" and "the blue square" may be
    the same object), alternating relational and plain ones from a random first kind."""
    kinds = [[e for e in expressions if e.relational], [e for e in expressions if not e.relational]]
    kinds = [[kind[i] for i in rng.permutation(len(kind))] for kind in kinds]
    first = int(rng.integers(2))
    order = [kinds[first], kinds[1 - first]]
    picked: dict[tuple[int, ...], ReferringExpression] = {}
    while len(picked) < per_image and any(order):
        for kind in order:
            while kind and len(picked) < per_image:
                expression = kind.pop(0)
                if expression.targets not in picked:
                    picked[expression.targets] = expression
                    break
    return list(picked.values())


def _objects_of(record: dict) -> list[ShapeInScene]:
    """The scene's objects from a detection record (json category ids, XYWH boxes)."""
    objects = []
    for anno in record["annotations"]:
        colour, shape = ALL_PAIRS[anno["category_id"] - 1]
        x, y, w, h = anno["bbox"]
        objects.append(ShapeInScene(colour, shape, (x, y, x + w, y + h)))
    return objects


def _referring_annotation(anno: dict, phrase: str) -> dict:
    span = [[0, len(phrase)]]
    return {
        "bbox": [float(v) for v in anno["bbox"]],
        "bbox_mode": anno["bbox_mode"],
        "category_id": 0,
        "iscrowd": 0,
        "segmentation": anno["segmentation"],
        "tokens_positive": span,
        "phrase_ids": [0],
    }


def _phrase_entry(phrase: str, relational: bool) -> dict:
    """The one evaluated phrase; its PhraseCut type is "relation" or "attribute" (the colour)."""
    phrase_type = "relation" if relational else "attribute"
    return {"phrase_id": 0, "tokens_positive": [[0, len(phrase)]], "phrase_type": phrase_type,
            "phrase_types": [phrase_type]}


def referring_records(detection_records: list[dict], seed: int = 0, per_image: int = 2) -> list[dict]:
    """Referring dataset dicts of the scenes in `detection_records` (as load_grounding_coco_json
    returns them for a synthetic json, raw category ids), deterministically from `seed`."""
    records = []
    for record in detection_records:
        objects = _objects_of(record)
        rng = np.random.default_rng([seed, record["image_id"]])
        for expression in _pick(referring_expressions(objects), per_image, rng):
            phrase = expression.phrase
            records.append({
                "file_name": record["file_name"],
                "height": record["height"],
                "width": record["width"],
                "image_id": len(records) + 1,
                "original_img_id": record["image_id"],
                "task": "grounding",
                "weak": False,
                "caption": phrase,
                "annotations": [_referring_annotation(record["annotations"][i], phrase) for i in expression.targets],
                "phrases": [_phrase_entry(phrase, expression.relational)],
            })
    return records


def register_synthetic_referring(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    num_train: int = 600,
    num_val: int = 150,
    num_heldout: int = 100,
    per_image: int = 2,
) -> None:
    """Register glipv2_synthetic_referring_{train,val}: up to `per_image` phrases per scene of the
    train / val split, evaluated with the PhraseCut metrics. The scenes are generated on first use."""
    root = Path(root if root is not None else default_synthetic_root()).absolute()
    metadata = {"thing_classes": ["object"], "evaluator_type": PHRASECUT_EVALUATOR_TYPE}
    for split in REFERRING_SPLITS:
        name = f"glipv2_synthetic_referring_{split}"

        def load(split: str = split) -> list[dict]:
            json_file = generate_synthetic_shapes(root, seed, num_train, num_val, num_heldout)[split]
            scenes = load_grounding_coco_json(json_file, str(root / split), image_keys=())
            return referring_records(scenes, seed, per_image)

        unregister_dataset(name)
        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(image_root=str(root / split), **metadata)
