"""tools/train_net.py's trainer: an interrupted run resumed with --resume matches an uninterrupted one."""

import pytest
import torch
from detectron2.engine import HookBase

from glipv2_d2.data.datasets import register_synthetic_shapes
from glipv2_d2.engine.trainer import GLIPv2Trainer

from .tiny_model import tiny_cfg

LOSS_TERMS = ("total_loss", "loss_dot_product_token", "loss_reg", "loss_centerness")


class Interrupt(HookBase):
    """Simulates a killed job right after the checkpoint of iteration `at`."""

    def __init__(self, at: int):
        self.at = at

    def after_step(self) -> None:
        if self.trainer.iter == self.at:
            raise KeyboardInterrupt("simulated kill")


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    register_synthetic_shapes(root=root, num_train=12, num_val=4, num_heldout=4)
    yield root
    register_synthetic_shapes()


def train_cfg(output_dir, ema: bool = False):
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("glipv2_synthetic_train",)
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.MIN_SIZE_TRAIN = (112, 128)
    cfg.INPUT.MAX_SIZE_TRAIN = 160
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = 6
    cfg.SOLVER.STEPS = (4,)
    cfg.SOLVER.WARMUP_ITERS = 2
    cfg.SOLVER.CHECKPOINT_PERIOD = 3
    cfg.SOLVER.EMA.ENABLED = ema
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.2
    cfg.MODEL.DYHEAD.FUSION.DROPOUT = 0.1
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def losses_by_iteration(trainer) -> dict[int, tuple[float, ...]]:
    history = {name: dict((it, v) for v, it in trainer.storage.history(name).values()) for name in LOSS_TERMS}
    return {it: tuple(history[name][it] for name in LOSS_TERMS) for it in history["total_loss"]}


@pytest.mark.parametrize("ema", [False, True])
def test_resume_continues_exactly(synthetic_root, tmp_path, ema):
    torch.manual_seed(0)
    straight = GLIPv2Trainer(train_cfg(tmp_path / "straight", ema))
    straight.resume_or_load(resume=False)
    straight.train()
    expected = losses_by_iteration(straight)
    assert sorted(expected) == list(range(6))

    torch.manual_seed(0)
    first = GLIPv2Trainer(train_cfg(tmp_path / "interrupted", ema))
    first.register_hooks([Interrupt(at=2)])
    first.resume_or_load(resume=False)
    with pytest.raises(KeyboardInterrupt):
        first.train()

    torch.manual_seed(123)  # a fresh process: nothing but the checkpoint carries state over
    second = GLIPv2Trainer(train_cfg(tmp_path / "interrupted", ema))
    second.resume_or_load(resume=True)
    assert second.start_iter == 3
    second.train()
    resumed = losses_by_iteration(second)
    assert sorted(resumed) == [3, 4, 5]
    for it in (3, 4, 5):
        assert resumed[it] == pytest.approx(expected[it], rel=1e-6, abs=1e-7), it
    final_straight = straight.model.state_dict()
    for name, value in second.model.state_dict().items():
        torch.testing.assert_close(value, final_straight[name], rtol=1e-5, atol=1e-6)
    if ema:
        for name, value in second.ema.shadow.items():
            torch.testing.assert_close(value, straight.ema.shadow[name], rtol=1e-5, atol=1e-6)
