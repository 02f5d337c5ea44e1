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
