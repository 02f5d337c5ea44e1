"""What every benchmark of tools/benchmark.py needs around a timed call."""

import torch

__all__ = ["synchronize"]


def synchronize(device: str) -> None:
    """Wait for the device's queued kernels, so a CUDA timer measures the work and not its launch."""
    if device == "cuda":
        torch.cuda.synchronize()
