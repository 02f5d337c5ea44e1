"""The quick start's referring set: every phrase is true of the drawn scene and refers to exactly its
targets, and the records are what GroundingMapper consumes (PhraseCut's format)."""

import re

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import PolygonMasks

from glipv2_d2.data.datasets import load_grounding_coco_json, unregister_dataset
from glipv2_d2.data.grounding_mapper import GroundingMapper
from glipv2_quickstart import generate_synthetic_shapes, register_synthetic_referring
from glipv2_quickstart.referring import (
    RELATIONS,
    ShapeInScene,
    referring_expressions,
    referring_records,
    relation_holds,
)
from glipv2_quickstart.shapes import ALL_PAIRS, COLOURS, SHAPES

from .tiny_model import tiny_cfg

COUNTS = {"num_train": 2, "num_val": 12, "num_heldout": 1}
_NOUN = rf"(?:({'|'.join(COLOURS)}) )?({'|'.join(SHAPES)})(?:e?s)?"
PHRASE = re.compile(rf"the {_NOUN}(?: ({'|'.join(RELATIONS)}) the {_NOUN})?")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("referring") / "synthetic"
    json_file = generate_synthetic_shapes(root, seed=0, **COUNTS)["val"]
    return load_grounding_coco_json(json_file, str(root / "val"), image_keys=())


def test_relations_need_the_whole_box_on_the_side_and_are_undecided_in_between():
    square = (100.0, 100.0, 140.0, 140.0)
    assert relation_holds((10.0, 110.0, 90.0, 130.0), square, "left of") is True
    assert relation_holds((10.0, 110.0, 90.0, 130.0), square, "right of") is False
    assert relation_holds((90.0, 110.0, 110.0, 130.0), square, "left of") is None  # overlaps the square
    assert relation_holds((100.0, 150.0, 140.0, 190.0), square, "below") is True
    assert relation_holds((100.0, 150.0, 140.0, 190.0), square, "above") is False
    with pytest.raises(ValueError, match="'behind'"):
        relation_holds(square, square, "behind")


def test_expressions_of_a_hand_built_scene():
    objects = [
        ShapeInScene("red", "circle", (0, 0, 20, 20)),
        ShapeInScene("red", "circle", (200, 0, 220, 20)),
        ShapeInScene("blue", "square", (100, 0, 120, 20)),
        ShapeInScene("blue", "square", (100, 100, 120, 120)),
    ]
    expressions = {e.phrase: e.targets for e in referring_expressions(objects)}
    assert expressions["the red circles"] == (0, 1)
    assert expressions["the blue squares"] == (2, 3)
    assert "the red circle left of the square" not in expressions  # two squares: no unique landmark
    assert "the circle left of the blue square" not in expressions
    only_one_square = objects[:3]
    expressions = {e.phrase: e.targets for e in referring_expressions(only_one_square)}
    assert expressions["the red circle left of the square"] == (0,)
    assert expressions["the red circle right of the square"] == (1,)
    assert expressions["the square"] == (2,)


def _masks(record_annotations: list[dict], height: int, width: int) -> list[np.ndarray]:
    return [
        mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], height, width))).astype(bool)
        for a in record_annotations
    ]


def _pixel_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _entirely_on_side(box: tuple, landmark: tuple, relation: str) -> bool:
    (x0, y0, x1, y1), (lx0, ly0, lx1, ly1) = box, landmark
    return {"left of": x1 <= lx0, "right of": x0 >= lx1, "above": y1 <= ly0, "below": y0 >= ly1}[relation]


def _matches(colour: str | None, shape: str, pair: tuple[str, str]) -> bool:
    return pair[1] == shape and (colour is None or pair[0] == colour)


def test_every_phrase_is_true_and_exact_on_the_drawn_masks(scenes):
    records = referring_records(scenes, per_image=50)
    assert sum(" of " in r["caption"] or " above " in r["caption"] or " below " in r["caption"] for r in records) > 10
    scene_of = {scene["image_id"]: scene for scene in scenes}
    for record in records:
        scene = scene_of[record["original_img_id"]]
        pairs = [ALL_PAIRS[a["category_id"] - 1] for a in scene["annotations"]]
        masks = _masks(scene["annotations"], scene["height"], scene["width"])
        boxes = [_pixel_box(m) for m in masks]
        colour, shape, relation, landmark_colour, landmark_shape = PHRASE.fullmatch(record["caption"]).groups()
        described = [i for i, pair in enumerate(pairs) if _matches(colour, shape, pair)]
        if relation is None:
            expected = described
        else:
            (landmark,) = [i for i, pair in enumerate(pairs) if _matches(landmark_colour, landmark_shape, pair)]
            expected = [i for i in described if _entirely_on_side(boxes[i], boxes[landmark], relation)]
        targets = [
            next(i for i, a in enumerate(scene["annotations"]) if a["bbox"] == t["bbox"]) for t in record["annotations"]
        ]
        assert sorted(targets) == expected, record["caption"]
        target_masks = _masks(record["annotations"], record["height"], record["width"])
        assert all(np.array_equal(m, masks[i]) for m, i in zip(target_masks, targets))


def test_records_follow_the_phrasecut_format_and_are_deterministic(scenes):
    records = referring_records(scenes)
    assert records == referring_records(scenes) and records != referring_records(scenes, seed=1)
    assert len({r["image_id"] for r in records}) == len(records) and len(records) <= 2 * len(scenes)
    for record in records:
        whole = [[0, len(record["caption"])]]
        phrase_type = "relation" if any(f" {r} " in record["caption"] for r in RELATIONS) else "attribute"
        assert record["phrases"] == [
            {"phrase_id": 0, "tokens_positive": whole, "phrase_type": phrase_type, "phrase_types": [phrase_type]}
        ]
        assert all(a["category_id"] == 0 for a in record["annotations"])
        assert record["annotations"] and all(a["tokens_positive"] == whole for a in record["annotations"])
        assert all(a["segmentation"] and a["iscrowd"] == 0 for a in record["annotations"])


def test_grounding_mapper_turns_a_record_into_masked_targets_over_the_whole_phrase(scenes):
    record = next(r for r in referring_records(scenes) if len(r["annotations"]) > 1)
    cfg = tiny_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.RANDOM_FLIP = "none"
    train = GroundingMapper(cfg, is_train=True)(record, seed=0)
    instances = train["instances"]
    assert len(instances) == len(record["annotations"])
    tokens = train["prompt"].label_to_tokens[0]
    assert len(tokens) >= 2
    for row in instances.positive_map:
        assert row.nonzero().flatten().tolist() == list(tokens)
    assert isinstance(instances.gt_masks, PolygonMasks) and (instances.gt_masks.area() > 0).all()
    test = GroundingMapper(cfg, is_train=False)(record)
    assert test["prompt"].label_to_tokens[0] == tokens and test["annotations"] == record["annotations"]


def test_registration_is_lazy_and_names_the_phrasecut_evaluator(tmp_path):
    root = tmp_path / "synthetic"
    names = ["glipv2_synthetic_referring_train", "glipv2_synthetic_referring_val"]
    try:
        register_synthetic_referring(root, seed=0, **COUNTS)
        assert not root.exists()
        assert MetadataCatalog.get(names[1]).evaluator_type == "phrasecut"
        assert MetadataCatalog.get(names[1]).thing_classes == ["object"]
        records = DatasetCatalog.get(names[1])
        assert 12 <= len(records) <= 24 and records[0]["file_name"].startswith(str(root / "val"))
    finally:
        for name in names:
            unregister_dataset(name)
