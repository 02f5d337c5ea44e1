"""Shared fixtures: the official golden vectors and small configs."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

# Test vectors made with the official GLIP code; projects/GLIPv2/NUMERICS.md describes them.
DATA_DIR = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def golden() -> dict:
    """The per-module official golden cases (bi-attention, DyConv, head, post-processing, ...)."""
    return torch.load(DATA_DIR / "glip_golden_modules.pt", weights_only=True)


@dataclass
class ModuleCall:
    """One forward call of a hooked module: its positional inputs and its output."""

    args: tuple
    output: Any


@contextmanager
def recorded_calls(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[ModuleCall]]]:
    """Record every forward call of each named module while the block runs, in call order.

    Forward hooks let the golden tests compare intermediate tensors without the library keeping
    test-only return paths.
    """
    record: dict[str, list[ModuleCall]] = {name: [] for name in modules}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple, output: Any) -> None:
            record[name].append(ModuleCall(args, output))
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


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
