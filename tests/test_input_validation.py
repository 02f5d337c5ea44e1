"""Bad data is refused where it enters, with an error naming it, or counted in one warning; never
trained on silently (issue 10: COCO jsons, image arrays, prompts and vocabularies; issue 11: masks)."""

import json
import logging

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets.lvis import get_lvis_instances_meta
from detectron2.structures import BoxMode
from detectron2.utils import logger as detectron2_logger

from glipv2_d2.data.datasets import load_grounding_coco_json, register_grounding_coco, unregister_dataset
from glipv2_d2.data.datasets.annotation_checks import mask_drop_reason
from glipv2_d2.data.image_io import array_to_bgr, read_image
from glipv2_d2.data.mappers import DetectionGroundingMapper, transformed_instances
from glipv2_d2.data.prompt_builder import PromptBuilder
from glipv2_d2.data.prompts import category_uid, locate_phrases
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_d2.modeling.language import build_tokenizer

from .tiny_model import tiny_cfg


def _coco(annotations: list[dict], images: list[dict] | None = None) -> dict:
    images = images or [
        {"id": 7, "file_name": "a.jpg", "height": 40, "width": 60},
        {"id": 8, "file_name": "b.jpg", "height": 40, "width": 60},
    ]
    for i, anno in enumerate(annotations, start=1):
        anno.setdefault("id", i)
        anno.setdefault("category_id", 1)
        anno.setdefault("iscrowd", 0)
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "dog"}]}


def _write(tmp_path, content: dict) -> str:
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(content))
    return str(path)


def _load(tmp_path, content: dict) -> list[dict]:
    return load_grounding_coco_json(_write(tmp_path, content), str(tmp_path), "test_input_validation")


# --- COCO-format json ---------------------------------------------------------------------------


def test_duplicate_image_id_is_an_error_naming_file_and_id(tmp_path):
    images = [
        {"id": 7, "file_name": "a.jpg", "height": 40, "width": 60},
        {"id": 7, "file_name": "b.jpg", "height": 40, "width": 60},
    ]
    with pytest.raises(ValueError, match=r"custom\.json: image id 7 is used by more than one"):
        _load(tmp_path, _coco([{"image_id": 7, "bbox": [1, 1, 5, 5]}], images))


def test_negative_box_size_is_an_error_naming_file_image_and_annotation(tmp_path):
    content = _coco([{"image_id": 7, "bbox": [1, 1, 5, 5]}, {"image_id": 8, "bbox": [30, 1, -10, 5], "id": 42}])
    with pytest.raises(ValueError, match=r"custom\.json: image 8 \(.*b\.jpg\), annotation id 42: .*negative"):
        _load(tmp_path, content)


def test_segmentation_without_bbox_fails_at_load_time_naming_image_and_annotation(tmp_path):
    polygon = [[1, 1, 10, 1, 10, 10]]
    content = _coco([{"image_id": 7, "segmentation": polygon, "id": 3}])
    with pytest.raises(ValueError, match=r"image 7 \(.*a\.jpg\), annotation id 3: has no 'bbox'"):
        _load(tmp_path, content)


def test_unusable_boxes_are_dropped_with_one_counted_warning(tmp_path, caplog):
    content = _coco(
        [
            {"image_id": 7, "bbox": [1, 1, 5, 5]},  # kept
            {"image_id": 7, "bbox": [float("nan"), 1, 5, 5]},
            {"image_id": 7, "bbox": [70, 1, 5, 5]},  # right of the 60-pixel-wide image
            {"image_id": 8, "bbox": [-20, 1, 5, 5]},  # left of it
            {"image_id": 8, "bbox": [3, 3, 0, 5]},
            {"image_id": 8, "bbox": [55, 35, 20, 20]},  # partly inside: kept
        ]
    )
    with caplog.at_level(logging.WARNING, logger="glipv2_d2.data.datasets.coco_lvis"):
        dicts = _load(tmp_path, content)
    assert [a["bbox"] for d in dicts for a in d["annotations"]] == [[1, 1, 5, 5], [55, 35, 20, 20]]
    assert all("id" not in a for d in dicts for a in d["annotations"])
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1
    assert "dropped 4 of 6 boxes" in warnings[0] and "custom.json" in warnings[0]
    assert "2 with entirely outside the image" in warnings[0]
    assert "1 with NaN or infinite coordinates" in warnings[0] and "1 with zero width or height" in warnings[0]


def test_registered_custom_json_is_validated_when_loaded(tmp_path):
    path = _write(tmp_path, _coco([{"image_id": 7, "bbox": [1, 1, -5, 5]}]))
    register_grounding_coco("test_input_validation_custom", path, str(tmp_path))
    try:
        with pytest.raises(ValueError, match="image 7"):
            DatasetCatalog.get("test_input_validation_custom")
    finally:
        unregister_dataset("test_input_validation_custom")


# --- masks (issue 11) ----------------------------------------------------------------------------


SQUARE = [5.0, 5.0, 15.0, 5.0, 15.0, 15.0, 5.0, 15.0]


def test_masks_that_draw_nothing_are_removed_boxes_kept_with_one_named_warning(tmp_path, caplog):
    content = _coco(
        [
            {"image_id": 7, "bbox": [5, 5, 10, 10], "segmentation": [SQUARE], "id": 1},  # kept
            {"image_id": 7, "bbox": [5, 5, 10, 10], "segmentation": [], "id": 2},
            {"image_id": 8, "bbox": [5, 5, 10, 10], "segmentation": [[70, 1, 80, 1, 80, 9]], "id": 3},  # x > 60
            {"image_id": 8, "bbox": [5, 5, 10, 10], "segmentation": [[1, 1, 9, 1], SQUARE], "id": 4},  # 2-point part
        ]
    )
    with caplog.at_level(logging.WARNING, logger="glipv2_d2.data.datasets.coco_lvis"):
        dicts = _load(tmp_path, content)
    annotations = [a for d in dicts for a in d["annotations"]]
    assert [a["bbox"] for a in annotations] == [[5, 5, 10, 10]] * 4
    assert [a.get("segmentation") for a in annotations] == [[SQUARE], None, None, [SQUARE]]
    (warning,) = [r.getMessage() for r in caplog.records if "masks" in r.getMessage()]
    assert "custom.json: removed the masks of 2 annotations (their boxes kept)" in warning
    assert "1 with an empty polygon list" in warning and "1 with polygons entirely outside the image" in warning
    assert "the first is" in warning and "image 7 (" in warning and "a.jpg), annotation id 2" in warning


def test_rle_of_another_size_is_an_error_naming_image_and_annotation(tmp_path):
    rle = {"size": [30, 60], "counts": [0, 1800]}  # uncompressed RLE of a 30x60 mask on a 40x60 image
    content = _coco([{"image_id": 7, "bbox": [1, 1, 5, 5], "segmentation": rle, "id": 5, "iscrowd": 1}])
    with pytest.raises(ValueError, match=r"image 7 \(.*a\.jpg\), annotation id 5: RLE 'segmentation' of size 30x60"):
        _load(tmp_path, content)


def test_rle_of_the_image_size_is_kept(tmp_path):
    rle = {"size": [40, 60], "counts": [0, 2400]}
    content = _coco([{"image_id": 7, "bbox": [1, 1, 5, 5], "segmentation": rle, "iscrowd": 1}])
    (anno,) = [a for d in _load(tmp_path, content) for a in d["annotations"]]
    assert list(anno["segmentation"]["size"]) == [40, 60]


def test_malformed_polygon_is_an_error_naming_the_annotation():
    anno = {"bbox": [1, 1, 5, 5], "segmentation": [["a", "b", "c", "d", "e", "f"]]}
    with pytest.raises(ValueError, match="annotation X: a polygon must be a flat list of numbers"):
        mask_drop_reason(anno, 40, 60, "annotation X")


def _box_annotation(segmentation=None) -> dict:
    anno = {"bbox": [5, 5, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 0}
    if segmentation is not None:
        anno["segmentation"] = segmentation
    return anno


def test_image_mixing_boxes_with_and_without_masks_trains_boxes_only_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(detectron2_logger, "_LOG_TIMER", {})  # the warning is rate-limited per call site
    annotations = [_box_annotation([SQUARE]), _box_annotation()]
    with caplog.at_level(logging.WARNING, logger="glipv2_d2.data.mappers"):
        mixed = transformed_instances(annotations, T.TransformList([]), (40, 60), True, "polygon", "b.jpg (image 8)")
    assert len(mixed) == 2 and not mixed.has("gt_masks")
    assert any("b.jpg (image 8): 1 of 2 boxes have no mask" in r.getMessage() for r in caplog.records)

    whole = transformed_instances([_box_annotation([SQUARE])] * 2, T.TransformList([]), (40, 60), True, "polygon")
    assert whole.gt_masks.polygons[1][0].tolist() == SQUARE


def test_rle_masks_with_polygon_mask_format_name_the_key_to_change():
    rle = mask_util.encode(np.ones((40, 60), dtype=np.uint8, order="F"))  # as Detectron2's loader leaves RLE
    with pytest.raises(ValueError, match=r"c\.jpg: RLE masks need INPUT\.MASK_FORMAT 'bitmask'"):
        transformed_instances([_box_annotation(rle)], T.TransformList([]), (40, 60), True, "polygon", "c.jpg")
    bitmask = transformed_instances([_box_annotation(rle)], T.TransformList([]), (40, 60), True, "bitmask")
    assert bitmask.gt_masks.tensor.shape == (1, 40, 60) and bool(bitmask.gt_masks.tensor.all())


# --- images -------------------------------------------------------------------------------------


def test_float_images_in_unit_range_are_scaled():
    image = np.zeros((2, 3, 3), dtype=np.float32)
    image[0, 0] = [1.0, 0.5, 0.0]
    out = array_to_bgr(image)
    assert out.dtype == np.uint8 and out[0, 0].tolist() == [255, 128, 0] and out[1, 2].tolist() == [0, 0, 0]


def test_float_images_outside_unit_range_are_refused_with_the_range_seen():
    in_bytes = np.full((4, 4, 3), 200.0)
    in_bytes[0, 0] = 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\], got \[0, 200\].*astype\(np.uint8\)"):
        array_to_bgr(in_bytes)
    with pytest.raises(ValueError, match=r"\[0, 1\], got \[-0.5, 0.5\]"):
        array_to_bgr(np.array([[-0.5, 0.5]], dtype=np.float64))


def test_nan_or_infinite_pixels_are_refused():
    image = np.full((4, 4, 3), 0.5, dtype=np.float32)
    image[1, 2, 0] = np.nan
    image[3, 3, 1] = np.inf
    with pytest.raises(ValueError, match="2 NaN or infinite values"):
        array_to_bgr(image)


def test_directory_as_image_path_says_so(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"is a directory.*{tmp_path.name}"):
        read_image(tmp_path)


# --- prompts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder(build_tokenizer("bert-base-uncased"), max_query_len=16)


@pytest.mark.parametrize(
    "names, error, message",
    [
        (["dog", 3], TypeError, r"category 1 is not a string: 3"),
        (["dog", None], TypeError, r"category 1 is not a string: None"),
        (None, TypeError, r"expected a list of category names, got None"),
        ([], ValueError, r"empty"),
    ],
)
def test_category_lists_with_bad_items_name_the_item(builder, names, error, message):
    with pytest.raises(error, match=message):
        builder.categories(names)


def test_empty_phrases_or_spans_are_errors(builder):
    with pytest.raises(ValueError, match="phrases is empty"):
        builder.caption("a dog and a cat", phrases=[])
    with pytest.raises(ValueError, match="spans is empty"):
        builder.caption("a dog and a cat", spans=[])


def test_numpy_integer_spans_equal_python_ones(builder):
    caption = "a dog and a cat"
    as_numpy = locate_phrases(caption, spans=[np.array([2, 5]), (np.int64(12), np.int32(15))])
    assert as_numpy == locate_phrases(caption, spans=[[2, 5], [12, 15]]) == [("dog", [(2, 5)]), ("cat", [(12, 15)])]
    prompt = builder.caption(caption, spans=np.array([[2, 5], [12, 15]]))
    assert prompt.label_names == {0: "dog", 1: "cat"}


def test_repeated_category_is_prompted_once_with_a_warning(builder, caplog):
    with caplog.at_level(logging.WARNING, logger="glipv2_d2.data.prompts"):
        prompts = builder.categories(["dog", "cat", "Dog", "bird"])
    assert [sorted(p.label_names) for p in prompts] == [[0, 1, 3]]
    assert prompts[0].caption == "dog. cat. bird"
    repeats = [r.getMessage() for r in caplog.records if "repeats" in r.getMessage()]
    assert repeats == ["category 2 ('Dog') repeats category 0; it is dropped from the prompt so its boxes are "
                       "not returned twice"]


def test_names_that_share_a_category_uid_hash_are_both_prompted(caplog):
    names = ["blue green round dark boat", "green blue dark round ball"]
    assert category_uid(names[0]) == category_uid(names[1])  # a crc32 collision, found by search
    with caplog.at_level(logging.WARNING, logger="glipv2_d2.data.prompts"):
        (prompt,) = PromptBuilder(build_tokenizer("bert-base-uncased")).categories(names)
    assert sorted(prompt.label_names) == [0, 1] and not caplog.records


def test_a_dataset_vocabulary_keeps_a_repeated_name_under_its_own_label(builder, caplog):
    with caplog.at_level(logging.WARNING, logger="glipv2_d2.data.prompts"):
        (prompt,) = builder.categories(["dog", "cat", "Dog", "bird"], keep_repeats=True)
    assert sorted(prompt.label_names) == [0, 1, 2, 3] and not caplog.records
    dog, repeat = prompt.label_to_tokens[0], prompt.label_to_tokens[2]
    assert dog and repeat and set(dog).isdisjoint(repeat)
    ids = prompt.input_ids
    assert ids[dog].tolist() == ids[repeat].tolist()


def test_lvis_prompts_follow_the_official_chunk_layout():
    """The official LVIS evaluation prompts categories 40 at a time in id order, repeats included:
    31 chunks, chunk k holding categories 40k .. 40k+39, both LVIS "bow"s with tokens of their own."""
    names = get_lvis_instances_meta("lvis_v1")["thing_classes"]
    lvis_builder = PromptBuilder(build_tokenizer("bert-base-uncased"), max_query_len=256, chunk_size=40)
    prompts = lvis_builder.categories(names, keep_repeats=True)
    assert [sorted(p.label_names) for p in prompts] == [list(range(k, min(k + 40, 1203))) for k in range(0, 1203, 40)]
    bows = [label for label, name in enumerate(names) if name.startswith("bow_(")]
    assert len(bows) == 2
    (chunk,) = {label // 40 for label in bows}
    assert all(prompts[chunk].label_to_tokens[label] for label in bows)
    assert len(lvis_builder.categories(names)) == 30  # a user's list: repeats dropped, 1,198 names


def test_all_unknown_token_name_is_named_in_a_warning(builder, caplog):
    with caplog.at_level(logging.WARNING, logger="glipv2_d2.data.prompts"):
        builder.categories(["dog", "\U0001f984", "cat \U0001f431"])
    unknown = [r.getMessage() for r in caplog.records if "[UNK]" in r.getMessage()]
    assert len(unknown) == 1 and "'\U0001f984'" in unknown[0]


def test_too_long_category_fails_when_the_training_mapper_is_built(builder):
    names = ["dog", "a very long category name that takes far more than sixteen tokens of the budget"]
    with pytest.raises(ValueError, match=r"category 1 \('a very long .*'\) alone needs 16 tokens > the 14"):
        DetectionGroundingMapper(
            is_train=True, augmentations=[], image_format="BGR", prompt_builder=builder, class_names=names
        )


# --- predictor ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor() -> GLIPv2Predictor:
    return GLIPv2Predictor(tiny_cfg())


def test_predictor_names_bad_prompts(predictor):
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="no prompt: give categories, a caption or a prompt_file"):
        predictor(image, None)
    with pytest.raises(TypeError, match="category 1 is not a string: 3"):
        predictor(image, ["dog", 3])
    with pytest.raises(ValueError, match="a category list takes neither"):
        predictor(image, ["dog"], phrases=["dog"])


def test_predictor_returns_no_box_for_a_repeated_category(predictor):
    image = (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)
    repeated = predictor(image, ["red circle", "blue square", "red circle"])
    once = predictor(image, ["red circle", "blue square"])
    assert len(once) > 0
    assert set(repeated.pred_classes.tolist()) <= {0, 1}
    assert repeated.pred_boxes.tensor.equal(once.pred_boxes.tensor)
    assert repeated.scores.equal(once.scores)


def test_dataset_evaluation_scores_a_repeated_category_under_its_own_id(predictor):
    """A dataset's categories are all evaluated, so its prompt keeps a repeated name (as the
    official evaluation does) and boxes come back under both of its labels."""
    dataset = "glipv2_test_repeated_names"
    MetadataCatalog.get(dataset).set(thing_classes=["red circle", "blue square", "red circle"])
    try:
        detector = GLIPv2Trainer._evaluated_model(tiny_cfg(), predictor.model, dataset)
    finally:
        MetadataCatalog.remove(dataset)
    (prompt,) = detector.prompts
    assert prompt.caption == "red circle. blue square. red circle"
    image = (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)
    inputs = {"image": torch.as_tensor(image.transpose(2, 0, 1).copy()), "height": 48, "width": 48}
    detector.eval()
    with torch.no_grad():
        (output,) = detector([inputs])
    assert {0, 2} <= set(output["instances"].pred_classes.tolist())
