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


def _frozen_by_prefixes(cfg: CfgNode) -> dict[str, str]:
    """Freezing prefix -> the config key that asks for it."""
    prefixes = dict.fromkeys(cfg.SOLVER.FREEZE_PREFIXES, "SOLVER.FREEZE_PREFIXES")
    if cfg.MODEL.LANGUAGE_BACKBONE.FREEZE:
        prefixes.setdefault("language_backbone.", "MODEL.LANGUAGE_BACKBONE.FREEZE")
    return prefixes


def _top_level_names(names: list[str]) -> list[str]:
    return list(dict.fromkeys(name.split(".")[0] + "." for name in names))


def _check_train_only_prefixes(train_only: tuple[str, ...], frozen_by: dict[str, str], names: list[str]) -> None:
    """Every SOLVER.TRAIN_ONLY_PREFIXES entry must name trained parameters that no freezing key claims."""
    for prefix in train_only:
        claimed = [name for name in names if name.startswith(prefix)]
        if not claimed:
            raise ValueError(
                f"SOLVER.TRAIN_ONLY_PREFIXES entry {prefix!r} matches no parameter of the model "
                f"(its parameters start with {_top_level_names(names)})"
            )
        for frozen_prefix, key in frozen_by.items():
            both = next((name for name in claimed if name.startswith(frozen_prefix)), None)
            if both is not None:
                raise ValueError(
                    f"SOLVER.TRAIN_ONLY_PREFIXES entry {prefix!r} trains {both!r}, which {key} "
                    f"({frozen_prefix!r}) freezes: drop one of the two"
                )


def _use_running_statistics(module: nn.Module, _inputs: tuple) -> None:
    module.train(False)


def _keep_frozen_norms_in_eval_mode(model: nn.Module) -> None:
    """Frozen batch norms normalise with their stored statistics and never update them, even while
    the model trains (a forward pre-hook switches them to eval mode before every call)."""
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        is_frozen = bool(params) and not any(p.requires_grad for p in params)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats and is_frozen:
            module.register_forward_pre_hook(_use_running_statistics)
            module.train(False)


def freeze_parameters(cfg: CfgNode, model: nn.Module) -> list[str]:
    """Freeze parameters by name prefix and return their names.

    SOLVER.FREEZE_PREFIXES (and MODEL.LANGUAGE_BACKBONE.FREEZE) freeze what they name: prompt
    tuning, linear probing, a frozen text encoder. SOLVER.TRAIN_ONLY_PREFIXES freezes everything
    else: GLIPv2's second-stage mask pre-training trains the mask head alone (paper section 3.2).
    A prefix matching nothing, or a parameter both trained and frozen by the keys, is an error.
    Batch norms whose parameters are all frozen keep their running statistics.
    """
    names = [name for name, _ in model.named_parameters()]
    frozen_by = _frozen_by_prefixes(cfg)
    frozen_prefixes = tuple(frozen_by)
    if frozen_prefixes and not any(name.startswith(frozen_prefixes) for name in names):
        raise ValueError(f"SOLVER.FREEZE_PREFIXES {list(frozen_prefixes)} match no parameter of the model")
    train_only = tuple(cfg.SOLVER.TRAIN_ONLY_PREFIXES)
    _check_train_only_prefixes(train_only, frozen_by, names)
    frozen = []
    for name, param in model.named_parameters():
        if name.startswith(frozen_prefixes) or (train_only and not name.startswith(train_only)):
            param.requires_grad_(False)
            frozen.append(name)
    _keep_frozen_norms_in_eval_mode(model)
    return frozen


def describe_trainable(model: nn.Module) -> str:
    """How much of the model trains, for the training log."""
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    return (
        f"training {sum(p.numel() for p in trained):,} of {sum(p.numel() for p in params):,} parameters "
        f"({len(trained)} of {len(params)} tensors)"
    )
