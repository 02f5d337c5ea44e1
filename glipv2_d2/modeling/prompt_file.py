"""A tuned prompt on its own, as a small file: one set of model weights serves many tasks, each
task's prompt file holding only what prompt tuning learned for it.

Format (``torch.save`` of a dict of plain values and tensors, read with ``weights_only=True``):

- ``format`` ("glipv2-d2 tuned prompt"), ``version`` (1);
- ``caption``, ``input_ids`` (T,), ``token_categories`` (T,), ``label_to_tokens``, ``label_names``:
  the fixed prompt, as the model's tokenizer read it;
- ``base`` (T, H): the text-encoder output P of the prompt; ``offset`` (T, H): the learned offset
  (the model reads P + offset, never running its text encoder);
- ``model``: what the prompt was made for: the text encoder (class, hidden size, vocabulary size)
  and a fingerprint of the network's weights (backbone, text encoder, fusion, head);
- ``prompt_sha256``: hash of the caption and token ids, checked on reading.

Float32 throughout: a GLIP-T prompt of 60 tokens (768 wide) takes about 370 KB.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..structures import Prompt
from .prompt_tuning import NETWORK_PARTS, TunablePrompt

__all__ = [
    "PROMPT_FILE_FORMAT",
    "check_same_prompt",
    "load_prompt_file",
    "model_identity",
    "save_prompt_file",
    "tuned_prompt_for",
]

PROMPT_FILE_FORMAT = "glipv2-d2 tuned prompt"
PROMPT_FILE_VERSION = 1


def weights_fingerprint(model: nn.Module) -> str:
    """Hash of the names and of the first and last value of every parameter of the network parts:
    any training changes it, and it reads the same on every device (values are copied, not summed)."""
    prefixes = tuple(f"{part}." for part in NETWORK_PARTS)
    names, samples = [], []
    for name, parameter in model.named_parameters():
        if name.startswith(prefixes):
            flat = parameter.detach().reshape(-1)
            names.append(name)
            samples.append(flat[[0, -1]].float())
    digest = hashlib.sha256("\n".join(names).encode())
    digest.update(torch.cat(samples).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_identity(model: nn.Module) -> dict[str, object]:
    """What a prompt file is valid for: the text encoder and the exact network weights."""
    encoder = model.language_backbone
    return {
        "text_encoder": type(encoder).__name__,
        "hidden_size": int(encoder.hidden_size),
        "vocab_size": len(model.tokenizer),
        "weights": weights_fingerprint(model),
    }


def _describe(identity: Mapping[str, object]) -> str:
    return (
        f"{identity['text_encoder']} (hidden size {identity['hidden_size']}, vocabulary {identity['vocab_size']}), "
        f"weights {identity['weights']}"
    )


def _prompt_hash(caption: str, input_ids: Tensor) -> str:
    digest = hashlib.sha256(caption.encode())
    digest.update(input_ids.to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest()


def save_prompt_file(path: str | os.PathLike, tunable: TunablePrompt, model: nn.Module) -> None:
    """Write ``tunable``'s prompt, P and offset, for ``model``, to ``path`` (folders created)."""
    prompt = tunable.prompt
    state = {
        "format": PROMPT_FILE_FORMAT,
        "version": PROMPT_FILE_VERSION,
        "caption": prompt.caption,
        "input_ids": prompt.input_ids.cpu(),
        "token_categories": prompt.token_categories.cpu(),
        "label_to_tokens": {int(k): [int(t) for t in v] for k, v in prompt.label_to_tokens.items()},
        "label_names": {int(k): str(v) for k, v in prompt.label_names.items()},
        "base": tunable.base.detach().float().cpu(),
        "offset": tunable.offset.detach().float().cpu(),
        "model": model_identity(model),
        "prompt_sha256": _prompt_hash(prompt.caption, prompt.input_ids),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path)


def _read(path: str | os.PathLike) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable prompt file: {error}") from error
    if not isinstance(state, dict) or state.get("format") != PROMPT_FILE_FORMAT:
        raise ValueError(f"{path} is not a prompt file (no format {PROMPT_FILE_FORMAT!r}); write one by prompt tuning")
    if state.get("version") != PROMPT_FILE_VERSION:
        raise ValueError(f"{path}: prompt file version {state.get('version')}, this code reads {PROMPT_FILE_VERSION}")
    if _prompt_hash(state["caption"], state["input_ids"]) != state["prompt_sha256"]:
        raise ValueError(f"{path}: its prompt does not match its stored hash (the file was altered)")
    return state


def load_tunable_prompt(path: str | os.PathLike, model: nn.Module) -> TunablePrompt:
    """The file's prompt, P and offset, after checking that it was made for ``model``: the same
    text encoder and weights, and the same tokens for its caption. A mismatch names both sides."""
    state = _read(path)
    made_for, this_model = state["model"], model_identity(model)
    if made_for != this_model:
        raise ValueError(
            f"prompt file {path} was made for another model: {_describe(made_for)}; this model is "
            f"{_describe(this_model)}. Tune the prompt again with these weights."
        )
    input_ids = state["input_ids"]
    tokens = model.tokenizer(state["caption"], return_tensors="pt")["input_ids"][0]
    if not torch.equal(tokens, input_ids):
        raise ValueError(
            f"prompt file {path}: this model's tokenizer reads its prompt {state['caption']!r} as "
            f"{tokens.tolist()}, the file holds {input_ids.tolist()}"
        )
    prompt = Prompt(
        caption=state["caption"],
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        label_to_tokens={int(k): list(v) for k, v in state["label_to_tokens"].items()},
        token_categories=state["token_categories"],
        label_names={int(k): v for k, v in state["label_names"].items()},
    )
    return TunablePrompt(prompt, state["base"], state["offset"])


def load_prompt_file(path: str | os.PathLike, model: nn.Module) -> Prompt:
    """The tuned prompt of ``path`` (P + offset as its text embedding), checked against ``model``."""
    with torch.no_grad():
        return load_tunable_prompt(path, model).tuned()


def check_same_prompt(tuned: Prompt, expected: Prompt, source: str, task: str) -> None:
    """A tuned prompt only serves the prompt it was tuned on: same caption, tokens and labels."""
    same = (
        tuned.caption == expected.caption
        and torch.equal(tuned.input_ids.cpu(), expected.input_ids.cpu())
        and tuned.label_to_tokens == expected.label_to_tokens
    )
    if not same:
        raise ValueError(
            f"{source} was tuned on the prompt {tuned.caption!r} (labels {tuned.label_names}), but {task} "
            f"reads the prompt {expected.caption!r} (labels {expected.label_names})"
        )


def tuned_prompt_for(
    path: str | os.PathLike, model: nn.Module, vocabulary_prompts: Sequence[Prompt], task: str
) -> Prompt:
    """``path``'s tuned prompt in place of ``task``'s vocabulary prompts (one, since a tuned prompt
    is a single prompt), after checking it against the model and that vocabulary."""
    tuned = load_prompt_file(path, model)
    if len(vocabulary_prompts) != 1:
        raise ValueError(
            f"{task} needs {len(vocabulary_prompts)} prompts for its vocabulary; the tuned prompt of {path} is one"
        )
    check_same_prompt(tuned, vocabulary_prompts[0], f"prompt file {path}", task)
    return tuned
