"""Caption data: Karpathy-split loaders, Flickr30K grounded captions, registration, the caption
mapper, and the synthetic quick-start caption set."""

import json

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from glipv2_d2.data.caption_mapper import CaptionMapper
from glipv2_d2.data.datasets import CAPTION_EVALUATOR_TYPE, load_karpathy_captions, register_caption_datasets
from glipv2_d2.data.datasets.captions import load_grounded_flickr30k_captions
from glipv2_d2.modeling.language import build_tokenizer
from glipv2_quickstart.captions import synthetic_caption_records

from .tiny_model import tiny_cfg


def _image(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 120, dtype=np.uint8)).save(path)


def _karpathy(images):
    return {"images": images, "dataset": "fake"}


def _coco_entry(cocoid, split, folder="val2014"):
    return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "cocoid": cocoid, "imgid": cocoid,
            "split": split, "sentences": [{"raw": f"A cat number {cocoid}. ", "tokens": []},
                                          {"raw": "a cat", "tokens": []}]}


def test_karpathy_coco_splits_read_image_paths_ids_and_references(tmp_path):
    json_file = tmp_path / "dataset_coco.json"
    entries = [_coco_entry(1, "train", "train2014"), _coco_entry(2, "restval"), _coco_entry(3, "val"),
               _coco_entry(4, "test")]
    json_file.write_text(json.dumps(_karpathy(entries)))
    train = load_karpathy_captions(str(json_file), str(tmp_path / "coco"), ("train", "restval"))
    assert [r["image_id"] for r in train] == [1, 2]
    assert train[0]["file_name"] == str(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000001.jpg")
    assert train[0]["captions"] == ["A cat number 1.", "a cat"] and train[0]["task"] == "captioning"
    assert [r["image_id"] for r in load_karpathy_captions(str(json_file), str(tmp_path), ("test",))] == [4]
    with pytest.raises(ValueError, match="no image in the splits"):
        load_karpathy_captions(str(json_file), str(tmp_path), ("nothing",))


def test_an_empty_reference_is_refused_naming_the_image(tmp_path):
    entry = _coco_entry(1, "test")
    entry["sentences"].append({"raw": "  ", "tokens": []})
    json_file = tmp_path / "dataset_coco.json"
    json_file.write_text(json.dumps(_karpathy([entry])))
    with pytest.raises(ValueError, match="COCO_val2014_000000000001.jpg has an empty"):
        load_karpathy_captions(str(json_file), str(tmp_path), ("test",))


def _flickr_root(tmp_path):
    root = tmp_path / "datasets"
    images = [{"filename": f"{i}.jpg", "imgid": i, "split": split,
               "sentences": [{"raw": f"a dog {i}", "tokens": []}]}
              for i, split in ((100, "train"), (200, "val"), (300, "test"), (400, "restval"))]
    (root / "caption_datasets").mkdir(parents=True)
    (root / "caption_datasets" / "dataset_flickr30k.json").write_text(json.dumps(_karpathy(images)))
    for i in (100, 400):
        _image(root / "flickr30k" / "flickr30k_images" / "train" / f"{i}.jpg")
    _image(root / "flickr30k" / "flickr30k_images" / "test" / "300.jpg")
    mdetr = {
        "images": [{"id": k, "file_name": f"{i}.jpg", "height": 30, "width": 40, "caption": "a dog on grass",
                    "tokens_positive_eval": [[[0, 5]]], "sentence_id": 0, "original_img_id": i}
                   for k, i in enumerate((100, 200, 400))],
        "annotations": [{"id": k, "image_id": k, "bbox": [1, 2, 10, 10], "area": 100, "iscrowd": 0,
                         "category_id": 1, "tokens_positive": [[0, 5]]} for k in range(3)],
        "categories": [{"id": 1, "name": "object"}],
    }
    (root / "mdetr_annotations").mkdir()
    (root / "mdetr_annotations" / "final_flickr_separateGT_train.json").write_text(json.dumps(mdetr))
    return root


def test_flickr30k_karpathy_images_are_found_in_glips_per_split_folders(tmp_path):
    root = _flickr_root(tmp_path)
    images = root / "flickr30k" / "flickr30k_images"
    test = load_karpathy_captions(str(root / "caption_datasets" / "dataset_flickr30k.json"), str(images), ("test",))
    assert test == [{"file_name": str(images / "test" / "300.jpg"), "image_id": 300, "captions": ["a dog 300"],
                     "task": "captioning"}]


def test_grounded_flickr30k_captions_keep_karpathy_train_images_only(tmp_path):
    root = _flickr_root(tmp_path)
    records = load_grounded_flickr30k_captions(
        str(root / "mdetr_annotations" / "final_flickr_separateGT_train.json"),
        str(root / "caption_datasets" / "dataset_flickr30k.json"), str(root / "flickr30k" / "flickr30k_images"),
    )
    assert sorted(r["file_name"].rsplit("/", 1)[1] for r in records) == ["100.jpg", "400.jpg"]
    assert all(r["task"] == "grounding" and r["annotations"] for r in records)


def test_registration_names_the_sets_whose_files_exist(tmp_path):
    root = _flickr_root(tmp_path)
    try:
        register_caption_datasets(str(root))
        registered = set(DatasetCatalog.list())
        assert {"glipv2_flickr30k_karpathy_test", "glipv2_flickr30k_grounded_captions_train"} <= registered
        assert "glipv2_coco_karpathy_test" not in registered
        assert MetadataCatalog.get("glipv2_flickr30k_karpathy_test").evaluator_type == CAPTION_EVALUATOR_TYPE
        assert len(DatasetCatalog.get("glipv2_flickr30k_karpathy_train")) == 2  # train + restval
        assert len(DatasetCatalog.get("glipv2_flickr30k_grounded_captions_train")) == 2
    finally:
        register_caption_datasets("datasets")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(tiny_cfg().MODEL.LANGUAGE_BACKBONE.TOKENIZER)


def test_training_mapper_draws_one_reference_per_seed_as_the_prompt(tmp_path, tokenizer):
    _image(tmp_path / "a.jpg")
    record = {"file_name": str(tmp_path / "a.jpg"), "image_id": 7, "task": "captioning",
              "captions": ["a red circle left of a square", "one red circle", "a circle"]}
    cfg = tiny_cfg()
    cfg.INPUT.RANDOM_FLIP = "none"
    mapper = CaptionMapper(cfg, is_train=True, tokenizer=tokenizer)
    drawn = {seed: mapper(record, seed=seed) for seed in range(12)}
    assert {x["caption"] for x in drawn.values()} == set(record["captions"])
    sample = drawn[0]
    assert sample["prompt"].caption == sample["caption"] and "instances" not in sample
    assert mapper(record, seed=0)["caption"] == sample["caption"]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape[0] == 3


def test_a_flipped_training_image_swaps_left_and_right_in_its_caption(tmp_path, tokenizer):
    _image(tmp_path / "a.jpg")
    record = {"file_name": str(tmp_path / "a.jpg"), "image_id": 7, "captions": ["a circle left of a square"]}
    cfg = tiny_cfg()
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    mapper = CaptionMapper(cfg, is_train=True, tokenizer=tokenizer)
    captions = {mapper(record, seed=seed)["caption"] for seed in range(16)}
    assert captions == {"a circle left of a square", "a circle right of a square"}


def test_test_mapper_keeps_the_references_and_the_image_size(tmp_path, tokenizer):
    _image(tmp_path / "a.jpg", size=(40, 30))
    record = {"file_name": str(tmp_path / "a.jpg"), "image_id": 7, "captions": ["a", "b"]}
    sample = CaptionMapper(tiny_cfg(), is_train=False, tokenizer=tokenizer)(record)
    assert sample["captions"] == ["a", "b"] and (sample["height"], sample["width"]) == (30, 40)
    assert "prompt" not in sample


def test_synthetic_caption_val_set_holds_each_val_image_with_its_caption():
    grounding = [{"file_name": f"{i}.png", "height": 10, "width": 12, "image_id": i, "caption": f"scene {i}"}
                 for i in (1, 2)]
    records = synthetic_caption_records(grounding + [{**grounding[0], "caption": "again"}])
    assert [(r["image_id"], r["captions"]) for r in records] == [(1, ["scene 1", "again"]), (2, ["scene 2"])]
    assert all(r["task"] == "captioning" for r in records)
