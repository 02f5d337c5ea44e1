"""Optimizer of GLIP training: AdamW, a separate text-encoder learning rate, full-model clipping."""

import itertools

import torch
from detectron2.config import CfgNode
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn


def with_full_model_clipping(optimizer_cls: type[torch.optim.Optimizer], max_norm: float):
    """Optimizer class that clips the norm of ALL gradients together before each step.

    Detectron2's clipping works per parameter; GLIP clips the whole model ("full_model"). Under
    AMP, GradScaler unscales gradients before calling step(), so the norm is in true units.
    """

    class FullModelGradientClipping(optimizer_cls):
        def step(self, closure=None):
            params = itertools.chain.from_iterable(group["params"] for group in self.param_groups)
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure)

    FullModelGradientClipping.__name__ = f"{optimizer_cls.__name__}WithFullModelGradientClipping"
    return FullModelGradientClipping


def parameter_lr_factor(cfg: CfgNode):
    """Learning-rate factor per parameter name, as official GLIP's make_optimizer:
    LANG_LR / BASE_LR for the text encoder, BACKBONE_BODY_LR_FACTOR for the Swin body; plus
    FUSION_TEXT_LR_FACTOR for the BERT layers inside the fusion tower (1 in official GLIP)."""
    text_factor = cfg.SOLVER.LANG_LR / cfg.SOLVER.BASE_LR
    body_factor = cfg.SOLVER.BACKBONE_BODY_LR_FACTOR
    fusion_text_factor = cfg.SOLVER.FUSION_TEXT_LR_FACTOR

    def lr_factor(name: str) -> float:
        if name.startswith("language_backbone."):
            return text_factor
        if name.startswith("backbone.bottom_up."):
            return body_factor
        if name.startswith("fusion.") and ".text_layer." in name:
            return fusion_text_factor
        return 1.0

    return lr_factor


def build_glipv2_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        lr_factor_func=parameter_lr_factor(cfg),
    )
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer_cls, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        optimizer_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}: use ADAMW or SGD")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optimizer_cls = with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE)
    else:
        optimizer_cls = maybe_add_gradient_clipping(cfg, optimizer_cls)
    return optimizer_cls(params, lr=cfg.SOLVER.BASE_LR, **kwargs)


def freeze_parameters(cfg: CfgNode, model: nn.Module) -> list[str]:
    """Freeze parameters by name prefix (prompt tuning, linear probing, a frozen text encoder)."""
    prefixes = tuple(cfg.SOLVER.FREEZE_PREFIXES)
    if cfg.MODEL.LANGUAGE_BACKBONE.FREEZE:
        prefixes += ("language_backbone.",)
    frozen = []
    for name, param in model.named_parameters():
        if prefixes and name.startswith(prefixes):
            param.requires_grad_(False)
            frozen.append(name)
    if prefixes and not frozen:
        raise ValueError(f"SOLVER.FREEZE_PREFIXES {list(prefixes)} match no parameter of the model")
    return frozen
