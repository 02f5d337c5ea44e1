"""Shared fixtures: the official golden vectors and small configs."""

import os
from pathlib import Path

import pytest
import torch


def reference_dir() -> Path:
    override = os.environ.get("GLIPV2_REFERENCE_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(scope="session")
def golden() -> dict:
    path = reference_dir() / "glip_golden_modules.pt"
    if not path.is_file():
        raise FileNotFoundError(f"golden vectors not found at {path}; set GLIPV2_REFERENCE_DIR")
    return torch.load(path, weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def params_via_converter(params: dict, official_prefix: str, module_prefix: str) -> dict:
    """Golden module params (official names relative to the module) renamed by the checkpoint
    converter, then made relative to our module; keys the converter drops are dropped here too."""
    from glipv2_d2.checkpoint import is_ignored_official_key, official_to_model_key

    renamed = {}
    for key, value in params.items():
        if is_ignored_official_key(official_prefix + key):
            continue
        target = official_to_model_key(official_prefix + key)
        assert target is not None and target.startswith(module_prefix), (key, target)
        renamed[target.removeprefix(module_prefix)] = value
    return renamed
