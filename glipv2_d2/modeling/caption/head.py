"""The captioning head: a unidirectional language model on the fused text (paper §3.3, app. D.2).

In caption mode (``TaskHeadInputs.caption_mode``) every text token has read only itself, the tokens
before it and the image, so the fused state at position t predicts token t + 1 with a
cross-entropy loss ([CLS] predicts the first word, the last word predicts [SEP]).

The output layer is the MLM head's structure (``MaskedLanguageModelingHead``: dense -> act ->
LayerNorm -> vocabulary decoder), UNTIED from the word embeddings: it lives at
``task_heads.CaptionHead.lm.*``, starts from the text model's pretrained LM head when it ships one
(MODEL.CAPTION.INIT_FROM_TEXT_MODEL, as L_mlm does), and is trained with the model. Untied keeps the
detection text encoder's input embeddings free of the captioning loss's pull, and a model with both
L_mlm and captioning keeps the two heads apart; the price is one vocabulary-sized matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from torch import Tensor

from ..language.build import resolve_text_model_path
from ..language.tokenizer import build_tokenizer
from ..mlm import IGNORE_INDEX, MaskedLanguageModelingHead, load_pretrained_mlm_head
from ..task_heads import TASK_HEAD_REGISTRY, GroundedTaskHead, TaskHeadInputs
from .options import CaptionDecodingOptions

__all__ = ["CaptionHead", "next_token_labels"]


def next_token_labels(input_ids: Sequence[Tensor], num_tokens: int) -> Tensor:
    """(B, num_tokens) targets: position t holds token t + 1 of its caption, ``IGNORE_INDEX`` at
    the caption's last token and on padding."""
    labels = torch.full((len(input_ids), num_tokens), IGNORE_INDEX, dtype=torch.long)
    for row, ids in enumerate(input_ids):
        if len(ids) > num_tokens:
            raise ValueError(f"caption {row} has {len(ids)} tokens, the batch's text only {num_tokens}")
        labels[row, : len(ids) - 1] = ids[1:].cpu()
    return labels


@TASK_HEAD_REGISTRY.register()
class CaptionHead(GroundedTaskHead):
    """Next-token prediction from the causal fused text; decoding is the model's (``GLIPv2.generate_captions``)."""

    def __init__(self, cfg: CfgNode, input_shape: Sequence[ShapeSpec], text_dim: int):
        super().__init__()
        lang = cfg.MODEL.LANGUAGE_BACKBONE
        tokenizer = build_tokenizer(lang.TOKENIZER)
        self.lm = MaskedLanguageModelingHead(text_dim, len(tokenizer))  # one score per prompt token id
        if lang.LOAD_PRETRAINED and cfg.MODEL.CAPTION.INIT_FROM_TEXT_MODEL:
            load_pretrained_mlm_head(self.lm, resolve_text_model_path(lang.MODEL_PATH))
        self.loss_weight = cfg.MODEL.CAPTION.LOSS_WEIGHT
        self.options = CaptionDecodingOptions.from_config(cfg)
        self.use_cache = cfg.MODEL.CAPTION.USE_CACHE
        self.start_token_id = tokenizer.cls_token_id
        self.end_token_id = tokenizer.sep_token_id
        # never generated: padding, [CLS], [MASK], [UNK] and any other special token but the end
        self.banned_token_ids = sorted(set(tokenizer.all_special_ids) - {self.end_token_id})

    def logits(self, fused_text: Tensor) -> Tensor:
        """(..., D) fused text states -> (..., vocab) next-token scores in float32, special tokens
        other than the end token at -inf."""
        with torch.autocast(device_type=fused_text.device.type, enabled=False):
            scores = self.lm.logits(fused_text.to(self.lm.decoder.weight.dtype)).float()
        scores[..., self.banned_token_ids] = float("-inf")
        return scores

    def losses(self, inputs: TaskHeadInputs) -> dict[str, Tensor]:
        """``loss_caption``: mean next-token cross-entropy over the batch's caption tokens. Outside
        caption mode every token has seen its successor, so the head adds an attached zero (its
        parameters still get a gradient, as DDP needs) instead of a loss it could cheat on."""
        labels = next_token_labels([p.input_ids for p in inputs.prompts], inputs.text.shape[1])
        if not inputs.caption_mode:
            labels.fill_(IGNORE_INDEX)
        loss = self.lm(inputs.text, labels.to(inputs.text.device))
        return {"loss_caption": loss * self.loss_weight}

    def inference(self, inputs: TaskHeadInputs) -> list[dict]:
        """Nothing is added to detections: captions come from ``GLIPv2.generate_captions``."""
        return [{} for _ in inputs.prompts]
