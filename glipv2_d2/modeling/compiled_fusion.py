"""torch.compile of the fusion tower + prediction head at inference (``TEST.COMPILE_FUSION``), with a
fallback to eager execution when compilation fails.

The tower and head are 85% of a GLIP-T forward and, at batch 1 on a GPU, thousands of small kernels;
compiling fuses the element-wise ones and "reduce-overhead" replays them as one CUDA graph. The
compiled function is kept outside the module tree, so parameter names and checkpoints are unchanged,
and it is built on first use, so models are copied (EMA, evaluation) as plain modules.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["COMPILE_MODES", "CompiledFusion"]

logger = logging.getLogger(__name__)

# "": eager; otherwise the torch.compile mode ("reduce-overhead" adds CUDA graphs on CUDA).
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune")


def _cloned(value):
    """Tensors copied out of CUDA-graph memory, which the next replay overwrites."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    return value


class CompiledFusion:
    """Calls ``function`` through torch.compile(mode) when ``mode`` is set; if compiling or running the
    compiled code raises, logs the error once and runs ``function`` eagerly from then on (an error of
    the inputs themselves is then raised by the eager call)."""

    def __init__(self, function: Callable, mode: str):
        if mode not in COMPILE_MODES:
            raise ValueError(f"TEST.COMPILE_FUSION must be one of {COMPILE_MODES}, got {mode!r}")
        self.function = function
        self.mode = mode
        self.compiled: Callable | None = None
        self.failed = False

    def __deepcopy__(self, memo: dict) -> CompiledFusion:
        """A copy bound to the copied model (EMA), compiled afresh on its first use."""
        return CompiledFusion(copy.deepcopy(self.function, memo), self.mode)

    @property
    def active(self) -> bool:
        """Whether calls go through the compiled function."""
        return bool(self.mode) and not self.failed

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.function(*args, **kwargs)
        if self.compiled is None:
            self.compiled = torch.compile(self.function, mode=self.mode)
        try:
            if self.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
                return _cloned(self.compiled(*args, **kwargs))
            return self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - dynamo and inductor raise many exception types
            self.failed = True
            logger.warning("TEST.COMPILE_FUSION %r failed (%s: %s); running the fusion tower eagerly",
                           self.mode, type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            return self.function(*args, **kwargs)
