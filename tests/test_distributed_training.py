"""Several processes: GLIPv2Trainer under Detectron2's launch, 2 CPU processes talking over gloo."""

import math
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.engine import launch
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_quickstart import register_synthetic_shapes

from .tiny_model import tiny_cfg

WORLD_SIZE = 2
ITERATIONS = 3
SYNTHETIC_SIZES = {"num_train": 8, "num_val": 1, "num_heldout": 1}
# Scoring with the pre-fusion text and no L_mlm leaves the last fusion layer's text branch without
# gradient: DDP then needs find_unused_parameters, or it fails on the second step.
PRE_FUSION_SCORING = ["MODEL.DYHEAD.SCORE_WITH_FUSED_TEXT", "False", "MODEL.MLM.ENABLED", "False"]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """Generated once here, so the two processes only read it."""
    root = tmp_path_factory.mktemp("synthetic")
    register_synthetic_shapes(root=root, **SYNTHETIC_SIZES)
    DatasetCatalog.get("glipv2_synthetic_train")
    yield root
    register_synthetic_shapes()


def train_on_this_rank(synthetic_root: str, output_dir: str, overrides: list[str]) -> None:
    """One process of the launched job: train a few steps, save what the test compares."""
    torch.set_num_threads(1)
    register_synthetic_shapes(root=synthetic_root, **SYNTHETIC_SIZES)
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("glipv2_synthetic_train",)
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN = (96,)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.SOLVER.IMS_PER_BATCH = WORLD_SIZE
    cfg.SOLVER.MAX_ITER = ITERATIONS
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.CHECKPOINT_PERIOD = 100
    cfg.OUTPUT_DIR = output_dir
    cfg.merge_from_list(overrides)
    trainer = GLIPv2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    initial = {name: value.clone() for name, value in trainer.unwrapped_model.state_dict().items()}
    trainer.train()
    losses = [value for value, _ in trainer.storage.history("total_loss").values()] if comm.is_main_process() else []
    torch.save(
        {
            "world_size": comm.get_world_size(),
            "wrapped": isinstance(trainer.model, DistributedDataParallel),
            "initial": initial,
            "final": trainer.unwrapped_model.state_dict(),
            "losses": losses,
        },
        Path(output_dir) / f"rank{comm.get_rank()}.pt",
    )


@pytest.mark.parametrize("overrides", [[], PRE_FUSION_SCORING], ids=["fused_text", "pre_fusion_text"])
def test_two_processes_train_in_step(synthetic_root, tmp_path, overrides):
    launch(
        train_on_this_rank,
        num_gpus_per_machine=WORLD_SIZE,
        dist_url="auto",
        args=(str(synthetic_root), str(tmp_path), overrides),
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]
    assert all(rank["world_size"] == WORLD_SIZE and rank["wrapped"] for rank in ranks)
    losses = ranks[0]["losses"]
    assert len(losses) == ITERATIONS and all(math.isfinite(loss) and loss > 0 for loss in losses)
    first, second = ranks
    assert first["initial"].keys() == second["initial"].keys()
    for name, value in first["initial"].items():  # DDP starts every rank from rank 0's weights
        torch.testing.assert_close(second["initial"][name], value, rtol=0, atol=0)
    changed = 0
    for name, value in first["final"].items():  # each rank saw its own images, yet the steps agree
        torch.testing.assert_close(second["final"][name], value, rtol=1e-6, atol=1e-7)
        changed += not torch.equal(value, first["initial"][name])
    assert changed > len(first["final"]) // 2
