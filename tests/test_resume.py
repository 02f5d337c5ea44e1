"""tools/train_net.py's trainer: an interrupted run resumed with --resume matches an uninterrupted one;
EMA evaluation and AMP precision."""

import pytest
import torch
from detectron2.engine import AMPTrainer, HookBase
from torch import nn

from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_quickstart import register_synthetic_shapes

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


def train_cfg(output_dir, ema: bool = False, num_workers: int = 0):
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("glipv2_synthetic_train",)
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = num_workers
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


# Workers map samples in other processes, the main process maps them itself with NUM_WORKERS 0:
# neither may change a sample nor the per-step randomness of dropout and drop path.
@pytest.mark.parametrize(("ema", "num_workers"), [(False, 0), (True, 0), (False, 2)])
def test_resume_continues_exactly(synthetic_root, tmp_path, ema, num_workers):
    torch.manual_seed(0)
    straight = GLIPv2Trainer(train_cfg(tmp_path / "straight", ema, num_workers))
    straight.resume_or_load(resume=False)
    straight.train()
    expected = losses_by_iteration(straight)
    assert sorted(expected) == list(range(6))

    torch.manual_seed(0)
    first = GLIPv2Trainer(train_cfg(tmp_path / "interrupted", ema, num_workers))
    first.register_hooks([Interrupt(at=2)])
    first.resume_or_load(resume=False)
    with pytest.raises(KeyboardInterrupt):
        first.train()

    torch.manual_seed(123)  # a fresh process: nothing but the checkpoint carries state over
    second = GLIPv2Trainer(train_cfg(tmp_path / "interrupted", ema, num_workers))
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


def test_evaluation_sees_the_ema_weights_and_training_keeps_its_own(synthetic_root, tmp_path):
    cfg = train_cfg(tmp_path, ema=True)
    cfg.SOLVER.MAX_ITER = 2
    cfg.SOLVER.EMA.DECAY = 0.5
    cfg.TEST.EVAL_PERIOD = 2
    trainer = GLIPv2Trainer(cfg)
    trainer.resume_or_load(resume=False)
    name, parameter = next(iter(trainer.unwrapped_model.named_parameters()))
    evaluated = []

    def record_weights(cfg, model) -> dict:
        evaluated.append(parameter.detach().clone())
        return {}

    trainer.test = record_weights
    trainer.train()
    assert len(evaluated) == 1
    torch.testing.assert_close(evaluated[0], trainer.ema.shadow[name], rtol=0, atol=0)
    assert not torch.equal(parameter, trainer.ema.shadow[name])  # the trained weights are back


@pytest.mark.parametrize(
    ("precision", "dtype", "scaled"), [("float16", torch.float16, True), ("bfloat16", torch.bfloat16, False)]
)
def test_amp_trainer_is_built_in_the_configured_precision(precision, dtype, scaled):
    cfg = tiny_cfg()
    cfg.MODEL.DEVICE = "cuda"  # AMP trains on CUDA only; building the step trainer needs no GPU
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = precision
    model = nn.Linear(2, 2)
    step_trainer = GLIPv2Trainer.build_step_trainer(cfg, model, [], torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(step_trainer, AMPTrainer) and step_trainer.precision == dtype
    # bfloat16 needs no loss scaling; float16 scales where CUDA runs it
    assert step_trainer.grad_scaler.is_enabled() == (scaled and torch.cuda.is_available())
