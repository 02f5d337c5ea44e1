"""Exponential moving average of model weights (GLIP's MODEL_EMA), as a Detectron2 hook."""

import contextlib
from collections.abc import Iterator

import torch
from detectron2.engine import HookBase
from torch import nn


class ModelEMA:
    """Shadow copy of every floating-point parameter and buffer, updated after each step."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"SOLVER.EMA.DECAY must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self.reset(model)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart the average at `model`'s current weights, e.g. once pretrained weights are loaded."""
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into `model` (e.g. for evaluation)."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(backup, strict=False)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


class EMAHook(HookBase):
    def __init__(self, ema: ModelEMA, model: nn.Module):
        self.ema = ema
        self.model = model

    def after_step(self) -> None:
        self.ema.update(self.model)
