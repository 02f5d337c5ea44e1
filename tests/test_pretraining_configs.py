"""configs/glipv2_T.yaml (stage 1) and configs/pretrain/glipv2_T_stage2.yaml train on data folders laid
out as datasets/README.md says (Objects365, GoldG, Cap4M stand-ins built from synthetic scenes),
with the GLIP-T architecture swapped for the tiny test model to stay fast."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog

from glipv2_d2 import add_glipv2_config
from glipv2_d2.data.datasets import register_all_glipv2_datasets
from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_quickstart import generate_synthetic_shapes

from .tiny_model import REPO, tiny_cfg


def _subset(coco: dict, count: int) -> dict:
    images = coco["images"][:count]
    ids = {image["id"] for image in images}
    return {**coco, "images": images, "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def pretraining_root(tmp_path_factory):
    """A datasets root with every folder the stage-1 recipe reads, filled with a few synthetic scenes."""
    root = tmp_path_factory.mktemp("datasets")
    source = generate_synthetic_shapes(root / "synthetic", seed=0, num_train=4, num_val=1, num_heldout=1)
    coco = _subset(json.loads(Path(source["train"]).read_text()), 4)
    image_dirs = [root / "objects365" / "train", root / "gqa" / "images",
                  root / "flickr30k" / "flickr30k_images" / "train", root / "cap4m" / "images"]
    for folder in image_dirs:
        folder.mkdir(parents=True)
        for image in coco["images"]:
            shutil.copy(root / "synthetic" / "train" / image["file_name"], folder / image["file_name"])
    detection = {**coco, "annotations": [{k: v for k, v in a.items() if k != "tokens_positive"}
                                         for a in coco["annotations"]]}
    _write(root / "objects365" / "annotations" / "objects365_train.json", detection)
    grounded = {**coco, "annotations": [a for a in coco["annotations"] if a.get("tokens_positive")]}
    _write(root / "mdetr_annotations" / "final_mixed_train_no_coco.json", grounded)
    _write(root / "mdetr_annotations" / "final_flickr_separateGT_train.json", grounded)
    scored = {**grounded, "annotations": [{**a, "score": 0.9} for a in grounded["annotations"]]}
    _write(root / "cap4m" / "annotations" / "train.json", scored)
    register_all_glipv2_datasets(root)
    yield root
    register_all_glipv2_datasets()


def _recipe_on_tiny_model(config: str, output_dir: Path):
    recipe = add_glipv2_config(get_cfg())
    recipe.merge_from_file(str(REPO / "configs" / config))
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = recipe.DATASETS.TRAIN
    cfg.MODEL.INTER_IMAGE_LOSS = recipe.MODEL.INTER_IMAGE_LOSS.clone()
    cfg.MODEL.MLM = recipe.MODEL.MLM.clone()
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.SOLVER.IMS_PER_BATCH = 3
    cfg.SOLVER.MAX_ITER = 2
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.SOLVER.CHECKPOINT_PERIOD = 100
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


@pytest.mark.parametrize("config, with_mlm", [("glipv2_T.yaml", True), ("pretrain/glipv2_T_stage2.yaml", False)])
def test_pretraining_recipes_train_on_the_documented_layout(pretraining_root, tmp_path, config, with_mlm):
    cfg = _recipe_on_tiny_model(config, tmp_path)
    assert cfg.DATASETS.TRAIN == ("glipv2_objects365_train", "glipv2_goldg_train", "glipv2_cap4m_train")
    tasks = {record["task"] for name in cfg.DATASETS.TRAIN for record in DatasetCatalog.get(name)}
    assert tasks == {"detection", "grounding", "caption"}

    torch.manual_seed(0)
    trainer = GLIPv2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    history = trainer.storage.histories()
    assert ("loss_mlm" in history) == with_mlm
    assert "loss_inter_image" in history
    for name in ("total_loss", "loss_inter_image", "loss_dot_product_token"):
        assert all(math.isfinite(value) for value, _ in history[name].values())
