"""Official GLIP / GLIPv2 checkpoints (maskrcnn_benchmark layout) -> this model's state dict.

The mapping is explicit and strict: every official key is either renamed onto one of our
parameters, or belongs to a short list of entries that have no parameter here for a stated reason
(and are then checked, not silently dropped). Anything else — or any parameter of ours left without
a value — is an error that lists the offending keys.
"""

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import Tensor

OFFICIAL_PREFIX_RULES: tuple[tuple[str, str], ...] = (
    (r"^backbone\.body\.", "backbone.bottom_up."),
    (r"^backbone\.fpn\.fpn_inner(\d+)\.", "backbone.fpn_lateral{+1}."),
    (r"^backbone\.fpn\.fpn_layer(\d+)\.", "backbone.fpn_output{+1}."),
    (r"^backbone\.fpn\.top_blocks\.", "backbone.top_block."),
    (r"^language_backbone\.body\.model\.", "language_backbone.model."),
    (r"^rpn\.head\.dyhead_tower\.(\d+)\.", "fusion.layers.{tower}."),
    (r"^rpn\.head\.mlm_head\.", "mlm_head."),
    (r"^rpn\.head\.", "head."),
    (r"^rpn\.loss_evaluator\.shallow_contrastive_projection_image\.", "inter_image_loss.image_projection."),
    (r"^rpn\.loss_evaluator\.shallow_contrastive_projection_text\.", "inter_image_loss.text_projection."),
    (r"^rpn\.loss_evaluator\.shallow_log_scale$", "inter_image_loss.log_scale"),
    (r"^roi_heads\.mask\.", "mask_head."),
)

# Sub-modules of one official VL-DyHead layer, in tower order (index modulo 3); the fusion block's
# official keys already carry its "b_attn." name.
TOWER_PARTS = ("", "text_layer.", "dyconv.")

# Official entries with no parameter in this model; each is verified or documented, never loaded.
IGNORED_OFFICIAL_KEYS: dict[str, str] = {
    r"^rpn\.head\.cls_logits\.(weight|bias)$": "legacy closed-set classifier, frozen and unused by GLIP's "
    "dot-product head",
    r"^rpn\.anchor_generator\.cell_anchors\.\d+$": "anchors are recomputed; verify_cell_anchors() "
    "checks them against the checkpoint",
    r"^language_backbone\.body\.model\.embeddings\.position_ids$": "constant arange buffer that newer "
    "transformers no longer saves",
}


# Training-only parts (L_mlm head, L_inter projections): a checkpoint may lack them (GLIP weights
# fine-tuned with GLIPv2 losses keep their fresh initialisation) or carry them for a model built
# without them (GLIPv2 pre-training weights evaluated); neither is a mismatch.
OPTIONAL_MODEL_PREFIXES: tuple[str, ...] = ("mlm_head.", "inter_image_loss.")


def official_to_model_key(key: str) -> str | None:
    """Our parameter name for an official key, or None when no rule applies."""
    for pattern, target in OFFICIAL_PREFIX_RULES:
        match = re.match(pattern, key)
        if match is None:
            continue
        rest = key[match.end():]
        if "{+1}" in target:
            return target.replace("{+1}", str(int(match.group(1)) + 1)) + rest
        if "{tower}" in target:
            index = int(match.group(1))
            return target.replace("{tower}", str(index // 3)) + TOWER_PARTS[index % 3] + rest
        return target + rest
    return None


def is_ignored_official_key(key: str) -> bool:
    return any(re.match(pattern, key) for pattern in IGNORED_OFFICIAL_KEYS)


class CheckpointMismatchError(ValueError):
    """Raised when an official checkpoint and this model do not correspond key for key."""


def _strip_data_parallel(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def load_official_state_dict(path: str | Path, use_ema: bool = False,
                             trusted_pickle: bool = False) -> dict[str, Tensor]:
    """Read an official checkpoint file ({"model": ...} with "module." keys, or a bare state dict).

    `weights_only` loading is used unless the caller trusts the file (`trusted_pickle`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=not trusted_pickle)
    except Exception as error:
        raise CheckpointMismatchError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {error}); a truncated download or a "
            "legacy pickle (then pass trusted_pickle=True / --trusted-pickle if you trust its source)"
        ) from error
    if not isinstance(data, Mapping):
        raise CheckpointMismatchError(f"{path} holds a {type(data).__name__}, not a state dict")
    section = "model_ema" if use_ema else "model"
    if use_ema and section not in data:
        raise CheckpointMismatchError(f"{path} has no 'model_ema' entry (keys: {sorted(data)[:10]})")
    state_dict = data.get(section, data)
    return _strip_data_parallel(state_dict)


def convert_official_state_dict(official: Mapping[str, Tensor],
                                model_state: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Rename an official state dict; with `model_state` (our model's), enforce a one-to-one match.

    Raises CheckpointMismatchError listing unmatched keys on either side and shape mismatches.
    """
    converted: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in official.items():
        if is_ignored_official_key(key):
            continue
        target = official_to_model_key(key)
        if target is None:
            unmapped.append(key)
        else:
            converted[target] = value
    problems: list[str] = []
    if unmapped:
        problems.append(f"official keys with no mapping ({len(unmapped)}): {unmapped[:20]}")
    if model_state is not None:
        converted = {
            k: v for k, v in converted.items() if k in model_state or not k.startswith(OPTIONAL_MODEL_PREFIXES)
        }
        extra = sorted(set(converted) - set(model_state))
        missing = sorted(k for k in set(model_state) - set(converted) if not k.startswith(OPTIONAL_MODEL_PREFIXES))
        if extra:
            problems.append(f"official keys without a parameter in this model ({len(extra)}): {extra[:20]}")
        if missing:
            problems.append(f"model parameters absent from the checkpoint ({len(missing)}): {missing[:20]}")
        shapes = [
            f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(model_state[k].shape)}"
            for k in sorted(set(converted) & set(model_state))
            if converted[k].shape != model_state[k].shape
        ]
        if shapes:
            problems.append(f"shape mismatches ({len(shapes)}): {shapes[:20]}")
    if problems:
        raise CheckpointMismatchError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return converted


def verify_cell_anchors(official: Mapping[str, Tensor], model_cell_anchors: list[Tensor]) -> None:
    """Check the checkpoint's stored anchors equal the ones this model computes from its config."""
    stored = sorted(
        (int(k.rsplit(".", 1)[1]), v) for k, v in official.items()
        if re.match(r"^rpn\.anchor_generator\.cell_anchors\.\d+$", k)
    )
    if not stored:
        return
    if len(stored) != len(model_cell_anchors):
        raise CheckpointMismatchError(
            f"checkpoint has {len(stored)} anchor levels, the config builds {len(model_cell_anchors)}"
        )
    for level, anchors in stored:
        if not torch.allclose(anchors.float(), model_cell_anchors[level].float().cpu()):
            raise CheckpointMismatchError(
                f"anchor level {level} differs: checkpoint {anchors.tolist()} vs config "
                f"{model_cell_anchors[level].tolist()} (check MODEL.ATSS.ANCHOR_SIZES and the backbone strides)"
            )


def convert_official_checkpoint(path: str | Path, model: torch.nn.Module, use_ema: bool = False,
                                trusted_pickle: bool = False) -> dict[str, Tensor]:
    """Read, rename and check an official checkpoint against `model`; returns our state dict."""
    official = load_official_state_dict(path, use_ema=use_ema, trusted_pickle=trusted_pickle)
    converted = convert_official_state_dict(official, model.state_dict())
    verify_cell_anchors(official, list(model.anchor_generator.cell_anchors.buffers()))
    return converted


def save_detectron2_checkpoint(state_dict: Mapping[str, Tensor], path: str | Path) -> None:
    """Write a file Detectron2's DetectionCheckpointer loads as is (cfg.MODEL.WEIGHTS)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.contiguous() for k, v in state_dict.items()}, "__author__": "glipv2_d2"}, path)


def looks_official(state_dict: Mapping[str, Tensor]) -> bool:
    """True for maskrcnn_benchmark-layout keys (GLIP / GLIPv2 releases), with or without "module."."""
    return any(k.removeprefix("module.").startswith(("rpn.head.", "language_backbone.body.")) for k in state_dict)


class GLIPv2Checkpointer(DetectionCheckpointer):
    """Detectron2's checkpointer that also reads official GLIP files and can refuse partial loads.

    An official checkpoint given as MODEL.WEIGHTS is converted on the fly (same strict renaming as
    tools/convert_glip_checkpoint.py). With `strict=True` (inference), any missing, unexpected or
    mis-shaped key is an error listing the keys instead of a logged warning.
    """

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *, strict: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.strict = strict

    def _load_file(self, filename: str) -> dict:
        loaded = super()._load_file(filename)
        state = loaded.get("model", loaded) if isinstance(loaded, Mapping) else loaded
        if isinstance(state, Mapping) and looks_official(state):
            official = _strip_data_parallel(state)
            verify_cell_anchors(official, list(self.model.anchor_generator.cell_anchors.buffers()))
            return {"model": convert_official_state_dict(official), "__author__": "GLIP (converted)"}
        return loaded

    def _load_model(self, checkpoint: dict):
        incompatible = super()._load_model(checkpoint)
        if self.strict and incompatible is not None:
            missing = [k for k in incompatible.missing_keys if not k.startswith(OPTIONAL_MODEL_PREFIXES)]
            unexpected = [k for k in incompatible.unexpected_keys if not k.startswith(OPTIONAL_MODEL_PREFIXES)]
            problems = [
                f"{name} ({len(keys)}): {list(keys)[:20]}"
                for name, keys in (("missing", missing),
                                   ("unexpected", unexpected),
                                   ("wrong shape", incompatible.incorrect_shapes))
                if keys
            ]
            if problems:
                raise CheckpointMismatchError("checkpoint does not match the model: " + "; ".join(problems))
        return incompatible
