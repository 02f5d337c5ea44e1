"""Shared fixtures: the official golden vectors and small configs."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


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


@pytest.fixture(scope="module")
def single_thread():
    """One OpenMP thread for a module's heavier tests: on a CPU shared with other jobs the threads
    spin against them, and one thread is far faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def half_red_half_blue_png(path: Path, height: int, width: int) -> str:
    """Write an image whose left half is red and right half blue: a horizontal flip shows in the pixels."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2, 0] = 255
    pixels[:, width // 2 :, 2] = 255
    Image.fromarray(pixels).save(path)
    return str(path)
