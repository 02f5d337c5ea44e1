"""Masked language modelling (L_mlm of GLIPv2, paper eq. 2): token masking, the prediction head, its loss.

Official behaviour (microsoft/GLIP, ``generalized_vl_rcnn.random_word`` and ``VLDyHead``): every
prompt is corrupted BERT-style before the text encoder, the fused text features go through a
``BertLMPredictionHead`` (``rpn.head.mlm_head.*``, its own decoder weights, not tied to the word
embeddings) and ``mlm_loss`` is the cross-entropy over the corrupted positions. Deliberate differences:

* masking is the caller's job and happens in TRAINING only; the official code also corrupts the
  prompts at evaluation, which silently degrades inference of any model trained with MLM on;
* special tokens ([CLS], [SEP], [UNK], ...) are never chosen and never used as random replacements
  (the official only spares padding, and draws replacements from the whole vocabulary);
* ``eligible`` restricts which tokens are CHOSEN. The official "greenlight map"
  (MLM_LOSS_FOR_ONLY_POSITIVES / MLM_OBJ_FOR_ONLY_POSITIVE) chooses among all tokens and only drops
  the labels outside the greenlit spans, so it corrupts tokens it never scores. To reproduce that,
  call ``mask_tokens`` without ``eligible`` and set the labels outside the spans to ``IGNORE_INDEX``;
* the head runs on the labelled positions only (same loss, a fraction of the vocabulary-sized
  logits), in float32, and returns an attached zero instead of NaN when nothing is labelled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerBase
from transformers.models.bert.modeling_bert import BertLMPredictionHead

__all__ = [
    "IGNORE_INDEX",
    "MaskedLanguageModelingHead",
    "MaskingVocabulary",
    "load_pretrained_mlm_head",
    "mask_tokens",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions the loss skips (torch cross-entropy's default ignore_index)
MASK_FRACTION = 0.8  # of the chosen tokens: replaced by [MASK]
RANDOM_FRACTION = 0.1  # of the chosen tokens: replaced by a random non-special token; the rest stay


@dataclass(frozen=True)
class MaskingVocabulary:
    """The token ids masking needs: [MASK], the ids never to choose or draw, the vocabulary size."""

    mask_token_id: int
    special_token_ids: tuple[int, ...]
    vocab_size: int

    def __post_init__(self):
        ids = (self.mask_token_id, *self.special_token_ids)
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(
                f"MaskingVocabulary: token ids {sorted(set(ids))} must lie in [0, vocab_size={self.vocab_size})"
            )
        if len(set(self.special_token_ids)) >= self.vocab_size:
            raise ValueError("MaskingVocabulary: no non-special token left to draw random replacements from")

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None) -> MaskingVocabulary:
        """From the prompt tokenizer; pass the MLM head's ``vocab_size`` when it differs from len(tokenizer)."""
        if tokenizer.mask_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no mask token; MLM needs one")
        return cls(
            mask_token_id=tokenizer.mask_token_id,
            special_token_ids=tuple(sorted(set(tokenizer.all_special_ids))),
            vocab_size=len(tokenizer) if vocab_size is None else vocab_size,
        )

    def replacement_ids(self, device: torch.device) -> Tensor:
        """All non-special ids, the pool random replacements are drawn from uniformly."""
        ids = torch.arange(self.vocab_size, device=device)
        return ids[~torch.isin(ids, torch.tensor(self.special_token_ids, device=device))]


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    vocab: MaskingVocabulary,
    *,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
    eligible: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT corruption of a (B, T) batch -> (masked_input_ids, labels), inputs left untouched.

    Each real (attention-masked), non-special, eligible token is chosen with ``probability``; a
    chosen token becomes [MASK] (80%), a random non-special token (10%) or stays (10%). ``labels``
    holds the original id at chosen positions and ``IGNORE_INDEX`` elsewhere.

    The random draws come from ``generator`` (default: the global RNG of ``input_ids``' device) on
    the generator's own device, so a CPU generator gives the same masks for CPU and CUDA inputs.
    Call it in training only.
    """
    _check_masking_inputs(input_ids, attention_mask, probability, eligible)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, _as_tensor(vocab.special_token_ids, input_ids))
    if eligible is not None:
        candidates &= eligible.bool()
    pool = vocab.replacement_ids(input_ids.device)
    pick = _draw(input_ids, generator, torch.rand)
    action = _draw(input_ids, generator, torch.rand)
    random_ids = pool[_draw(input_ids, generator, partial(torch.randint, len(pool)))]
    chosen = candidates & (pick < probability)
    to_mask = chosen & (action < MASK_FRACTION)
    to_random = chosen & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)
    masked = torch.where(to_mask, torch.full_like(input_ids, vocab.mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


def _check_masking_inputs(input_ids: Tensor, attention_mask: Tensor, probability: float,
                          eligible: Tensor | None) -> None:
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be a (B, T) integer tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    for name, mask in (("attention_mask", attention_mask), ("eligible", eligible)):
        if mask is not None and mask.shape != input_ids.shape:
            raise ValueError(f"{name} shape {tuple(mask.shape)} differs from input_ids shape {tuple(input_ids.shape)}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"masking probability must be in [0, 1], got {probability}")


def _draw(like: Tensor, generator: torch.Generator | None, sampler: Callable[..., Tensor]) -> Tensor:
    """A sample of like's shape made on the generator's device (so seeds do not depend on where the
    batch lives), returned on like's device."""
    device = generator.device if generator is not None else like.device
    return sampler(like.shape, generator=generator, device=device).to(like.device)


def _as_tensor(ids: Iterable[int], like: Tensor) -> Tensor:
    return torch.tensor(list(ids), dtype=like.dtype, device=like.device)


class MaskedLanguageModelingHead(BertLMPredictionHead):
    """transformers' BERT LM head (dense -> act -> LayerNorm -> decoder) whose forward is the MLM loss.

    Subclassing (not wrapping) keeps the official parameter names at the top level: as the model
    attribute ``mlm_head`` it owns ``mlm_head.transform.{dense,LayerNorm}.*``, ``mlm_head.decoder.weight``
    and ``mlm_head.bias`` / ``mlm_head.decoder.bias``. Those two are ONE tensor, as in the official
    head: transformers >= 5 no longer ties them inside the module (its PreTrainedModel does), so
    they are tied here, else ``bias`` would be a parameter no loss ever reaches.
    """

    def __init__(self, hidden_size: int, vocab_size: int, hidden_act: str = "gelu", layer_norm_eps: float = 1e-12):
        super().__init__(
            BertConfig(hidden_size=hidden_size, vocab_size=vocab_size, hidden_act=hidden_act,
                       layer_norm_eps=layer_norm_eps)
        )
        self.decoder.bias = self.bias

    @classmethod
    def from_text_config(cls, config: Any) -> MaskedLanguageModelingHead:
        """From the text encoder's config (hidden_size, vocab_size; BERT's act/eps when absent, as official)."""
        return cls(
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            hidden_act=getattr(config, "hidden_act", "gelu"),
            layer_norm_eps=getattr(config, "layer_norm_eps", 1e-12),
        )

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., H) text features -> (..., vocab) scores."""
        return super().forward(hidden)

    def forward(self, fused_text: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the labelled tokens of (B, T, H) features and (B, T) labels.

        Only labelled rows reach the decoder. The head runs with autocast off on float32 inputs
        (its weights stay float32 under AMP): vocabulary-wide logits in bf16/fp16 lose the small
        differences the softmax depends on. With no label set it returns 0 built from the head's
        own (empty) output, so every head parameter still gets a (zero) gradient: under DDP each
        rank must produce a gradient for every parameter, or the all-reduce waits forever.
        """
        if fused_text.shape[:-1] != labels.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match fused_text {tuple(fused_text.shape)} "
                "(expected (B, T) for (B, T, H))"
            )
        selected = labels != IGNORE_INDEX
        hidden = fused_text[selected]
        with torch.autocast(device_type=fused_text.device.type, enabled=False):
            scores = self.logits(hidden.to(self.decoder.weight.dtype)).float()
        if scores.shape[0] == 0:
            return scores.sum() * 0.0
        return F.cross_entropy(scores, labels[selected])


_LM_HEAD_PREFIX = "cls.predictions."
_TRANSFORM_KEYS = ("transform.dense.weight", "transform.dense.bias",
                   "transform.LayerNorm.weight", "transform.LayerNorm.bias")


class _LanguageModelHeadCheckpoint(BertForMaskedLM):
    """BertForMaskedLM loaded with no encoder layer: the LM head and the word embeddings its decoder
    may be tied to are all the MLM head needs, so the text encoder's layers are not read a second
    time. The skipped layers (and BertForPreTraining's other parts) are expected, not reported."""

    _keys_to_ignore_on_load_unexpected = [r"encoder\.layer\.", r"pooler\.", r"cls\.seq_relationship\."]


def load_pretrained_mlm_head(head: MaskedLanguageModelingHead, path: str | Path) -> bool:
    """Copy a Hugging Face BERT checkpoint's LM head (``cls.predictions.*``) into ``head``.

    ``path``: what ``from_pretrained`` takes (a local folder, or a hub name when online); transformers
    reads the files (shards, safetensors or .bin, TF-era gamma/beta names, a decoder weight stored
    only as the tied word embeddings). Returns False, leaving ``head`` untouched, when the checkpoint
    has no LM head (a bare BertModel such as the MiniLM folder).
    """
    source = str(Path(path).expanduser())
    checkpoint, info = _LanguageModelHeadCheckpoint.from_pretrained(
        source, num_hidden_layers=0, output_loading_info=True
    )
    missing = {k.removeprefix(_LM_HEAD_PREFIX) for k in info["missing_keys"] if k.startswith(_LM_HEAD_PREFIX)}
    if missing >= set(_TRANSFORM_KEYS):
        logger.info("%s has no %s* tensors; the MLM head keeps its initialisation", source, _LM_HEAD_PREFIX)
        return False
    if missing:
        raise ValueError(
            f"{source}: incomplete LM head, missing {', '.join(sorted(_LM_HEAD_PREFIX + k for k in missing))}"
        )
    state = checkpoint.cls.predictions.state_dict()
    state["bias"] = state["decoder.bias"]  # the bias the checkpoint's model adds; one tensor in our head
    _check_shapes(head, state, source)
    head.load_state_dict(state)
    return True


def _check_shapes(head: MaskedLanguageModelingHead, state: dict[str, Tensor], source: str) -> None:
    expected = head.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs head {tuple(expected[k].shape)}"
             for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{source}: LM head does not fit the text encoder's MLM head ({'; '.join(wrong)})")
