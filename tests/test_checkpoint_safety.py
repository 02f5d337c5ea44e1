"""Checkpoints run no code unless trusted, and unreadable ones are errors that name the file.

A crafted pickle whose unpickling creates a marker folder is given to every path that reads a
checkpoint (predictor, training, --eval-only, --resume): the marker must never appear, and each
refusal must name the file and the switch that allows it (MODEL.TRUST_PICKLED_WEIGHTS).
"""

import os
import pickle
from pathlib import Path

import pytest
import torch
from detectron2.engine import default_argument_parser

from glipv2_d2.checkpoint import (
    CheckpointFileError,
    UntrustedCheckpointError,
    load_official_state_dict,
    read_checkpoint_file,
)
from glipv2_d2.engine.launcher import main as launcher_main
from glipv2_d2.engine.predictor import GLIPv2Predictor
from glipv2_d2.engine.trainer import GLIPv2Trainer
from glipv2_quickstart import register_synthetic_shapes

from .tiny_model import REPO, tiny_cfg

SWITCH = "MODEL.TRUST_PICKLED_WEIGHTS"


class CreatesMarker:
    """Unpickling this runs os.mkdir(marker): the code a hostile checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def write_malicious(path: Path, marker: Path) -> str:
    """A Detectron2-looking checkpoint: a legacy pickle for .pkl, torch.save's format otherwise."""
    payload = {"model": {"backbone.weight": CreatesMarker(marker)}, "__author__": "attacker"}
    if path.suffix == ".pkl":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    return str(path)


def assert_refused(error: pytest.ExceptionInfo, path: str, marker: Path) -> None:
    assert not marker.exists(), "the checkpoint's code ran"
    assert path in str(error.value) and SWITCH in str(error.value)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    register_synthetic_shapes(root=root, num_train=2, num_val=1, num_heldout=1)
    yield root
    register_synthetic_shapes()


@pytest.fixture(scope="module")
def reference_state() -> dict[str, torch.Tensor]:
    """State dict of a tiny model that differs from a fresh one (seeded differently)."""
    torch.manual_seed(7)
    model = GLIPv2Predictor(tiny_cfg()).model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def predictor_cfg(weights: str, trust: bool = False):
    cfg = tiny_cfg()
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.TRUST_PICKLED_WEIGHTS = trust
    return cfg


def train_cfg(output_dir: Path, weights: str = "", trust: bool = False):
    cfg = predictor_cfg(weights, trust)
    cfg.DATASETS.TRAIN = ("glipv2_synthetic_train",)
    cfg.DATASETS.TEST = ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 1
    cfg.SOLVER.MAX_ITER = 2
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def tag_last_checkpoint(output_dir: Path, filename: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "last_checkpoint").write_text(filename)


def launcher_args(output_dir: Path, weights: str, *flags: str):
    overrides = [
        "MODEL.DEVICE", "cpu", "MODEL.LANGUAGE_BACKBONE.LOAD_PRETRAINED", "False",
        "MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS", "2", "DATASETS.TEST", "()",
        "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(output_dir),
    ]
    config = str(REPO / "configs" / "quickstart" / "demo.yaml")
    return default_argument_parser().parse_args(["--config-file", config, *flags, *overrides])


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_predictor_refuses_malicious_checkpoint(tmp_path, suffix):
    marker = tmp_path / "marker"
    weights = write_malicious(tmp_path / f"evil{suffix}", marker)
    with pytest.raises(UntrustedCheckpointError) as error:
        GLIPv2Predictor(predictor_cfg(weights))
    assert_refused(error, weights, marker)


def test_training_refuses_malicious_weights(synthetic_root, tmp_path):
    marker = tmp_path / "marker"
    weights = write_malicious(tmp_path / "evil.pkl", marker)
    trainer = GLIPv2Trainer(train_cfg(tmp_path / "out", weights))
    with pytest.raises(UntrustedCheckpointError) as error:
        trainer.resume_or_load(resume=False)
    assert_refused(error, weights, marker)


def test_resume_refuses_malicious_last_checkpoint(synthetic_root, tmp_path):
    marker = tmp_path / "marker"
    output_dir = tmp_path / "out"
    tag_last_checkpoint(output_dir, "model_0000001.pkl")
    weights = write_malicious(output_dir / "model_0000001.pkl", marker)
    trainer = GLIPv2Trainer(train_cfg(output_dir))
    with pytest.raises(UntrustedCheckpointError) as error:
        trainer.resume_or_load(resume=True)
    assert_refused(error, weights, marker)
    assert "last_checkpoint" in str(error.value)


@pytest.mark.parametrize("resume", [False, True])
def test_eval_only_refuses_malicious_checkpoint(tmp_path, resume):
    marker = tmp_path / "marker"
    output_dir = tmp_path / "out"
    tag_last_checkpoint(output_dir, "evil.pkl")
    weights = write_malicious(output_dir / "evil.pkl", marker)
    flags = ["--eval-only", "--resume"] if resume else ["--eval-only"]
    with pytest.raises(UntrustedCheckpointError) as error:
        launcher_main(launcher_args(output_dir, "" if resume else weights, *flags))
    assert_refused(error, weights, marker)


def test_trusted_legacy_detectron2_pickle_loads(tmp_path, reference_state):
    legacy = {"model": {k: v.numpy() for k, v in reference_state.items()}, "__author__": "Detectron2"}
    weights = tmp_path / "legacy.pkl"
    weights.write_bytes(pickle.dumps(legacy))
    with pytest.raises(UntrustedCheckpointError):
        GLIPv2Predictor(predictor_cfg(str(weights)))
    loaded = GLIPv2Predictor(predictor_cfg(str(weights), trust=True)).model.state_dict()
    for key, value in reference_state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_trusted_weights_reach_the_trainer(synthetic_root, tmp_path, reference_state):
    weights = tmp_path / "legacy.pkl"
    weights.write_bytes(pickle.dumps({"model": reference_state, "__author__": "Detectron2"}))
    trainer = GLIPv2Trainer(train_cfg(tmp_path / "out", str(weights), trust=True))
    trainer.resume_or_load(resume=False)
    loaded = trainer.unwrapped_model.state_dict()
    for key, value in reference_state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_plain_checkpoint_loads_without_trust(tmp_path, reference_state):
    weights = tmp_path / "model.pth"
    torch.save({"model": reference_state}, weights)
    loaded = GLIPv2Predictor(predictor_cfg(str(weights))).model.state_dict()
    key = next(iter(reference_state))
    torch.testing.assert_close(loaded[key], reference_state[key], rtol=0, atol=0)


def test_missing_weights_name_the_file(tmp_path):
    weights = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match=f"{weights} does not exist"):
        GLIPv2Predictor(predictor_cfg(weights))


def test_empty_weights_name_the_file(tmp_path):
    weights = tmp_path / "empty.pth"
    weights.touch()
    with pytest.raises(CheckpointFileError, match=f"{weights} is empty"):
        GLIPv2Predictor(predictor_cfg(str(weights)))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_truncated_weights_name_the_file(tmp_path, reference_state, suffix):
    weights = tmp_path / f"truncated{suffix}"
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pkl":
        whole.write_bytes(pickle.dumps({"model": reference_state, "__author__": "Detectron2"}))
    else:
        torch.save({"model": reference_state}, whole)
    weights.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointFileError, match=f"cannot read checkpoint {weights}: it is truncated"):
        GLIPv2Predictor(predictor_cfg(str(weights), trust=True))


def test_directory_as_weights_names_it(tmp_path):
    with pytest.raises(CheckpointFileError, match=f"{tmp_path} is not a file"):
        GLIPv2Predictor(predictor_cfg(str(tmp_path)))


def test_resume_from_missing_last_checkpoint_names_it(synthetic_root, tmp_path):
    output_dir = tmp_path / "out"
    tag_last_checkpoint(output_dir, "model_0000009.pth")
    trainer = GLIPv2Trainer(train_cfg(output_dir))
    with pytest.raises(FileNotFoundError, match="model_0000009.pth does not exist.*last_checkpoint"):
        trainer.resume_or_load(resume=True)


def test_official_reader_refuses_pickled_objects_unless_trusted(tmp_path):
    marker = tmp_path / "marker"
    path = write_malicious(tmp_path / "official.pth", marker)
    with pytest.raises(UntrustedCheckpointError) as error:
        load_official_state_dict(path)
    assert_refused(error, path, marker)
    read_checkpoint_file(path, trust_pickle=True)
    assert marker.is_dir(), "trusting the file must load it with full pickle"
