"""Prompt tuning (official GLIP's ``language_prompt_v2``, paper section 3.3 "one set of weights for all").

The task's prompt is fixed (its whole vocabulary, in order), its text-encoder output P is computed
once, and a learnable offset of P's shape is added to it before the fusion; every network parameter
stays frozen. Because the fusion is deep, the offset changes the visual features too. Official GLIP
keeps a zero-initialised 1000 x H table and adds its first T rows to the encoder output at every
step; with the encoder frozen and in eval mode that is the same as adding a (T, H) offset to P
computed once, which is what ``TunablePrompt`` holds.
"""

from __future__ import annotations

import dataclasses

import torch
from detectron2.structures import Instances
from torch import Tensor, nn

from ..data.prompts import token_map_to_positive_map
from ..structures import Prompt

__all__ = ["NETWORK_PARTS", "PromptTuningModel", "TunablePrompt", "encode_prompt_once"]

# The parts a prompt's detections flow through; prompt tuning keeps them frozen and in eval mode,
# as official GLIP switches its backbone, FPN and VL-DyHead to eval() for language_prompt_v2.
NETWORK_PARTS = ("backbone", "language_backbone", "fusion", "head")


@torch.no_grad()
def encode_prompt_once(detector: nn.Module, prompt: Prompt) -> Tensor:
    """P: the (T, H) text-encoder output of ``prompt``, read in eval mode (no dropout) through the
    model's own ``encode_text``, so that an untuned offset reproduces the untuned detections."""
    encoder = detector.language_backbone
    was_training = encoder.training
    encoder.eval()
    try:
        plain = dataclasses.replace(prompt, text_embedding=None)
        return detector.encode_text([plain]).hidden[0, : len(prompt)].detach().clone()
    finally:
        encoder.train(was_training)


class TunablePrompt(nn.Module):
    """One fixed prompt, its encoder output P (buffer ``base``) and the learned ``offset``."""

    def __init__(self, prompt: Prompt, base: Tensor, offset: Tensor | None = None):
        super().__init__()
        self.prompt = dataclasses.replace(prompt, text_embedding=None)
        if base.shape[0] != len(prompt):
            raise ValueError(f"base embedding has {base.shape[0]} rows for a prompt of {len(prompt)} tokens")
        self.register_buffer("base", base.detach().clone())
        self.offset = nn.Parameter(torch.zeros_like(self.base) if offset is None else offset.detach().clone())

    def tuned(self) -> Prompt:
        """The prompt carrying P + offset as its text embedding (the encoder is then not run)."""
        return dataclasses.replace(self.prompt, text_embedding=self.base + self.offset)


def _with_prompt(x: dict, prompt: Prompt) -> dict:
    """A training input read with ``prompt``: its boxes' positive map rebuilt from their labels, so
    that whatever prompt the mapper sampled, the boxes ground on the fixed prompt's tokens."""
    instances = x["instances"]
    labels = instances.gt_classes.tolist()
    unknown = sorted(set(labels) - set(prompt.label_to_tokens))
    if unknown:
        where = x.get("file_name", "an image")
        raise ValueError(f"{where}: labels {unknown} are not in the tuned prompt {prompt.caption!r}")
    fields = instances.get_fields()
    fields["positive_map"] = token_map_to_positive_map(prompt.label_to_tokens, labels, len(prompt)).bool()
    return {**x, "prompt": prompt, "instances": Instances(instances.image_size, **fields)}


class PromptTuningModel(nn.Module):
    """A frozen GLIPv2 ``detector`` trained through one ``TunablePrompt``: the only parameter is the
    offset. Every training input is read with the tuned prompt; inference runs it without the text
    encoder."""

    def __init__(self, detector: nn.Module, prompt: Prompt):
        super().__init__()
        if getattr(detector, "mlm_head", None) is not None:
            raise ValueError("prompt tuning trains the grounding losses only: set MODEL.MLM.ENABLED False")
        for parameter in detector.parameters():
            parameter.requires_grad_(False)
        self.detector = detector
        self.prompt = TunablePrompt(prompt, encode_prompt_once(detector, prompt))
        self._keep_network_in_eval_mode()

    @property
    def device(self) -> torch.device:
        return self.detector.device

    @property
    def tokenizer(self):
        return self.detector.tokenizer

    @property
    def leaves_parameters_unused(self) -> bool:
        return False

    def _keep_network_in_eval_mode(self) -> None:
        for name in NETWORK_PARTS:
            getattr(self.detector, name).eval()

    def train(self, mode: bool = True) -> PromptTuningModel:
        super().train(mode)
        self._keep_network_in_eval_mode()
        return self

    def forward(self, batched_inputs: list[dict]) -> list[dict] | dict[str, Tensor]:
        tuned = self.prompt.tuned()
        if not self.training:
            return self.detector.inference([{**x, "prompt": tuned} for x in batched_inputs])
        # An evaluation in between (inference_context) may have put the network back in train mode.
        self._keep_network_in_eval_mode()
        return self.detector([_with_prompt(x, tuned) for x in batched_inputs])
