"""Official GLIP / GLIPv2 checkpoints (maskrcnn_benchmark layout) -> this model's state dict.

The mapping is explicit and strict: every official key is either renamed onto one of our
parameters, or belongs to a short list of entries that have no parameter here for a stated reason
(and are then checked, not silently dropped). Anything else — or any parameter of ours left without
a value — is an error that lists the offending keys.
"""

import os
import pickle
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import Tensor

OFFICIAL_PREFIX_RULES: tuple[tuple[str, str], ...] = (
    (r"^backbone\.body\.", "backbone.bottom_up."),
    (r"^backbone\.fpn\.fpn_inner(\d+)\.", "backbone.fpn_lateral{+1}."),
    (r"^backbone\.fpn\.fpn_layer(\d+)\.", "backbone.fpn_output{+1}."),
    (r"^backbone\.fpn\.top_blocks\.", "backbone.top_block."),
    (r"^language_backbone\.body\.model\.", "language_backbone.model."),
    (r"^language_backbone\.body\.", "language_backbone.model."),  # CLIP type: the body is the model
    (r"^rpn\.head\.dyhead_tower\.(\d+)\.", "fusion.layers.{tower}."),
    (r"^rpn\.head\.mlm_head\.", "mlm_head."),
    (r"^rpn\.head\.", "head."),
    (r"^rpn\.loss_evaluator\.shallow_contrastive_projection_image\.", "inter_image_loss.image_projection."),
    (r"^rpn\.loss_evaluator\.shallow_contrastive_projection_text\.", "inter_image_loss.text_projection."),
    (r"^rpn\.loss_evaluator\.shallow_log_scale$", "inter_image_loss.log_scale"),
    (r"^roi_heads\.mask\.", "task_heads.MaskHead."),
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


# OFFICIAL_PREFIX_RULES read backwards, for writing a model's weights as an official release would
# hold them. The text encoder is written under the BERT-type prefix (a CLIP-type one has no "model."
# there officially); the converter reads both back to the same key.
MODEL_PREFIX_RULES: tuple[tuple[str, str], ...] = (
    (r"^backbone\.bottom_up\.", "backbone.body."),
    (r"^backbone\.fpn_lateral(\d+)\.", "backbone.fpn.fpn_inner{-1}."),
    (r"^backbone\.fpn_output(\d+)\.", "backbone.fpn.fpn_layer{-1}."),
    (r"^backbone\.top_block\.", "backbone.fpn.top_blocks."),
    (r"^language_backbone\.model\.", "language_backbone.body.model."),
    (r"^fusion\.layers\.(\d+)\.(text_layer\.|dyconv\.)?", "rpn.head.dyhead_tower.{tower}."),
    (r"^mlm_head\.", "rpn.head.mlm_head."),
    (r"^head\.", "rpn.head."),
    (r"^inter_image_loss\.image_projection\.", "rpn.loss_evaluator.shallow_contrastive_projection_image."),
    (r"^inter_image_loss\.text_projection\.", "rpn.loss_evaluator.shallow_contrastive_projection_text."),
    (r"^inter_image_loss\.log_scale$", "rpn.loss_evaluator.shallow_log_scale"),
    (r"^task_heads\.MaskHead\.", "roi_heads.mask."),
)


def model_to_official_key(key: str) -> str | None:
    """The official name of one of our keys (None when it has none), checked by converting it back:
    the two rule lists cannot drift apart unnoticed."""
    for pattern, target in MODEL_PREFIX_RULES:
        match = re.match(pattern, key)
        if match is None:
            continue
        rest = key[match.end():]
        if "{-1}" in target:
            official = target.replace("{-1}", str(int(match.group(1)) - 1)) + rest
        elif "{tower}" in target:
            index = 3 * int(match.group(1)) + TOWER_PARTS.index(match.group(2) or "")
            official = target.replace("{tower}", str(index)) + rest
        else:
            official = target + rest
        if official_to_model_key(official) != key:
            raise AssertionError(f"{key} -> {official} converts back to {official_to_model_key(official)}")
        return official
    return None


def to_official_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """``model``'s weights under official GLIP names, with its cell anchors as a release stores them:
    what ``GLIPv2Checkpointer`` / ``convert_official_checkpoint`` read. Lets tests and checks load
    random weights the way a user loads an official checkpoint."""
    state = model.state_dict()
    names = {key: model_to_official_key(key) for key in state}
    unnamed = [key for key, name in names.items() if name is None]
    if unnamed:
        raise CheckpointMismatchError(f"parameters with no official name ({len(unnamed)}): {unnamed[:20]}")
    official = {names[key]: value for key, value in state.items()}
    for level, anchors in enumerate(model.anchor_generator.cell_anchors.buffers()):
        official[f"rpn.anchor_generator.cell_anchors.{level}"] = anchors
    return official


class CheckpointMismatchError(ValueError):
    """Raised when an official checkpoint and this model do not correspond key for key."""


class UntrustedCheckpointError(ValueError):
    """A checkpoint that only full unpickling can read: that would run code stored in the file."""


class CheckpointFileError(ValueError):
    """A checkpoint file that is empty or cannot be read (an interrupted download or save)."""


# The one switch that allows full unpickling, named in every refusal.
TRUST_SWITCH = "MODEL.TRUST_PICKLED_WEIGHTS True"

# Files Detectron2 reads with plain pickle.load (.pkl) or torch.load without weights_only (.pyth).
FULL_PICKLE_SUFFIXES = (".pkl", ".pyth")


def _refusal(path: str | os.PathLike, reason: str) -> UntrustedCheckpointError:
    return UntrustedCheckpointError(
        f"refusing to load checkpoint {path}: {reason}, and unpickling it could run code stored in the file. "
        f"If you trust its source, set {TRUST_SWITCH} (a config key or command-line override; "
        "tools/convert_glip_checkpoint.py: --trusted-pickle)."
    )


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Fail with the file's name when it is missing, not a file or empty, before any reader sees it
    (they would raise AssertionError / EOFError without saying which file)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not os.path.isfile(path):
        raise CheckpointFileError(f"checkpoint {path} is not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointFileError(f"checkpoint {path} is empty (0 bytes): an interrupted download or save?")


@contextmanager
def _naming_unreadable(path: str | os.PathLike) -> Iterator[None]:
    """Turn a reader's bare error (EOFError, torch's stream errors) into one that names the file."""
    try:
        yield
    except (UntrustedCheckpointError, CheckpointFileError, FileNotFoundError):
        raise
    except Exception as error:
        raise CheckpointFileError(
            f"cannot read checkpoint {path}: it is truncated (an interrupted download or save?) or not a "
            f"checkpoint ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no details'})"
        ) from error


def read_checkpoint_file(path: str | os.PathLike, *, trust_pickle: bool = False) -> Any:
    """torch.load of a checkpoint on the CPU with `weights_only` (tensors and plain containers, no
    code from the file) unless `trust_pickle`; every failure names the file."""
    check_checkpoint_file(path)
    with _naming_unreadable(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as error:
            if trust_pickle or "Weights only load failed" not in str(error):
                raise
            raise _refusal(path, "it holds pickled objects other than tensors and plain containers") from None


def _strip_data_parallel(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def load_official_state_dict(path: str | Path, use_ema: bool = False,
                             trusted_pickle: bool = False) -> dict[str, Tensor]:
    """Read an official checkpoint file ({"model": ...} with "module." keys, or a bare state dict).

    `weights_only` loading is used unless the caller trusts the file (`trusted_pickle`).
    """
    path = Path(path)
    data = read_checkpoint_file(path, trust_pickle=trusted_pickle)
    if not isinstance(data, Mapping):
        raise CheckpointMismatchError(f"{path} holds a {type(data).__name__}, not a state dict")
    section = "model_ema" if use_ema else "model"
    if use_ema and section not in data:
        raise CheckpointMismatchError(f"{path} has no 'model_ema' entry (keys: {sorted(data)[:10]})")
    state_dict = data.get(section, data)
    if not isinstance(state_dict, Mapping):
        raise CheckpointMismatchError(f"{path}'s '{section}' entry is a {type(state_dict).__name__}, not a state dict")
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
    """Detectron2's checkpointer that also reads official GLIP files, runs no code from a file and
    can refuse partial loads.

    An official checkpoint given as MODEL.WEIGHTS is converted on the fly (same strict renaming as
    tools/convert_glip_checkpoint.py). Files are read with `weights_only`; formats that need full
    unpickling (.pkl, .pyth) are refused unless `trust_pickle` (MODEL.TRUST_PICKLED_WEIGHTS). With
    `strict=True` (inference), any missing, unexpected or mis-shaped key is an error listing the keys
    instead of a logged warning. A missing, empty or truncated file is an error that names it.
    """

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *, strict: bool = False,
                 trust_pickle: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.strict = strict
        self.trust_pickle = trust_pickle

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict:
        """Detectron2's resume_or_load; an unreadable file named by last_checkpoint says so."""
        try:
            return super().resume_or_load(path, resume=resume)
        except (UntrustedCheckpointError, CheckpointFileError, FileNotFoundError) as error:
            if not (resume and self.has_checkpoint()):
                raise
            named_by = os.path.join(self.save_dir, "last_checkpoint")
            raise type(error)(f"{error} (named by {named_by}, read by --resume)") from error

    def load(self, path: str, *args, **kwargs) -> dict:
        if path and "://" not in path:
            check_checkpoint_file(urlparse(path)._replace(query="").geturl())
        return super().load(path, *args, **kwargs)

    def _torch_load(self, filename: str) -> Any:
        return read_checkpoint_file(filename, trust_pickle=self.trust_pickle)

    def _load_file(self, filename: str) -> dict:
        check_checkpoint_file(filename)
        if filename.endswith(FULL_PICKLE_SUFFIXES):
            if not self.trust_pickle:
                raise _refusal(filename, "Detectron2 reads this format with full pickle")
            with _naming_unreadable(filename):
                loaded = super()._load_file(filename)
        else:
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
