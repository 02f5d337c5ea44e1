"""DATASETS.SEPARATOR reaches every prompt a config produces: training, evaluation and the predictor."""

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from glipv2_d2.data.mappers import DetectionGroundingMapper
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.engine.trainer import GLIPv2Trainer

from .conftest import half_red_half_blue_png
from .tiny_model import tiny_cfg, tiny_clip_cfg

NAMES = ["red circle", "blue square", "green triangle", "yellow star"]
SEPARATOR = " ; "
DATASET = "glipv2_test_separator"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    image = half_red_half_blue_png(tmp_path_factory.mktemp("separator") / "a.png", 64, 80)
    record = {"file_name": image, "image_id": 0, "height": 64, "width": 80, "annotations": [
        {"bbox": [4, 4, 30, 30], "bbox_mode": 0, "category_id": 1, "iscrowd": 0},
        {"bbox": [40, 10, 70, 50], "bbox_mode": 0, "category_id": 3, "iscrowd": 0},
    ]}
    DatasetCatalog.register(DATASET, lambda: [record])
    MetadataCatalog.get(DATASET).set(thing_classes=NAMES, evaluator_type="coco")
    yield record
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


@pytest.mark.parametrize("make_cfg", [tiny_cfg, tiny_clip_cfg], ids=["bert", "clip"])
def test_separator_is_shared_by_training_evaluation_and_predictor(dataset, make_cfg):
    cfg = make_cfg()
    cfg.DATASETS.SEPARATOR = SEPARATOR
    cfg.DATASETS.TRAIN = (DATASET,)
    cfg.DATASETS.TEST = (DATASET,)
    predictor = GLIPv2Predictor(cfg)
    whole_vocabulary = SEPARATOR.join(NAMES)

    (predicted,) = predictor.build_prompts(NAMES)
    (evaluated,) = GLIPv2Trainer._evaluated_model(cfg, predictor.model, DATASET).prompts
    tested = DetectionGroundingMapper(cfg, is_train=False)(dataset)["prompt"]
    assert predicted.caption == evaluated.caption == tested.caption == whole_vocabulary
    assert predicted.label_to_tokens == evaluated.label_to_tokens == tested.label_to_tokens

    trained = DetectionGroundingMapper(cfg, is_train=True)(dataset, seed=0)["prompt"]
    parts = trained.caption.split(SEPARATOR)
    assert len(parts) > 1 and set(parts) <= set(NAMES) and {"blue square", "yellow star"} <= set(parts)
    default = make_cfg()
    default.DATASETS.TRAIN = (DATASET,)
    untouched = DetectionGroundingMapper(default, is_train=True)(dataset, seed=0)["prompt"]
    assert untouched.caption == trained.caption.replace(SEPARATOR, ". ")
