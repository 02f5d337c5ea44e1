"""Captions for a batch of images: decoding (cached or recomputed, greedy or beam) and grounding.

Each output dict holds "caption" (text), "caption_score" (the hypothesis' length-normalised
log-probability), "caption_ended" (False when cut at max_length), "caption_tokens" (ids), and the
grounding: "caption_words" and "caption_phrases" (``GroundedSpan``s, boxes in output pixels) and
"instances" (one detection per phrase: pred_boxes, scores, pred_classes = phrase index,
pred_phrases) for Detectron2-style drawing. An empty caption (the end token first, allowed with
min_length 0) has no words, phrases or instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor

from .grounding import GroundedSpan, caption_words, content_phrases, ground_groups
from .options import CaptionDecodingOptions
from .search import CaptionHypothesis, beam_search, greedy_search
from .steppers import CachedCaptionStepper, RecomputingCaptionStepper

if TYPE_CHECKING:
    from ..meta_arch import GLIPv2

__all__ = ["check_caption_room", "generate_captions"]


def check_caption_room(model: GLIPv2, options: CaptionDecodingOptions) -> None:
    """[CLS] plus max_length tokens must fit the token limit and BERT's position table."""
    limit = min(model.max_query_len, model.language_backbone.model.config.max_position_embeddings)
    if options.max_length + 1 > limit:
        raise ValueError(
            f"caption max_length {options.max_length} plus [CLS] exceeds the text limit of {limit} tokens "
            "(MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN / the text model's position embeddings)"
        )


@torch.no_grad()
def generate_captions(
    model: GLIPv2, batched_inputs: list[dict], options: CaptionDecodingOptions, use_cache: bool = True
) -> list[dict]:
    """Caption every input ("image" in INPUT.FORMAT, optional "height"/"width"); see the module doc."""
    check_caption_room(model, options)
    head = model.task_heads["CaptionHead"]
    images = model.preprocess_image(batched_inputs)
    stepper = (CachedCaptionStepper if use_cache else RecomputingCaptionStepper)(model, images)
    if options.beam_size == 1:
        hypotheses, _ = greedy_search(stepper, head, options)
    else:
        hypotheses = beam_search(stepper, head, options)
    grounder = _Grounder(model, stepper.image, images)
    return [grounder.output(index, hypothesis, x) for index, (hypothesis, x) in
            enumerate(zip(hypotheses, batched_inputs, strict=True))]


@dataclass
class _Grounder:
    """Per image: the caption's fused text over the image side, region-word logits, best boxes."""

    model: GLIPv2
    image: object  # CaptionImageSide of the batch
    images: ImageList

    def output(self, index: int, hypothesis: CaptionHypothesis, x: dict) -> dict:
        head = self.model.task_heads["CaptionHead"]
        caption, words = caption_words(self.model.tokenizer, hypothesis.tokens)
        phrases = content_phrases(words)
        height, width = self.images.image_sizes[index]
        out_h, out_w = x.get("height", height), x.get("width", width)
        logits, boxes = self._regions(index, [head.start_token_id, *hypothesis.tokens])
        scale = boxes.new_tensor([out_w / width, out_h / height] * 2)
        word_boxes, word_scores = ground_groups(logits, boxes * scale, [w.positions for w in words])
        phrase_groups = [[p for w in phrase for p in w.positions] for phrase in phrases]
        phrase_boxes, phrase_scores = ground_groups(logits, boxes * scale, phrase_groups)
        grounded_phrases = [
            GroundedSpan(caption[phrase[0].span[0]:phrase[-1].span[1]], (phrase[0].span[0], phrase[-1].span[1]),
                         box.tolist(), float(score))
            for phrase, box, score in zip(phrases, phrase_boxes, phrase_scores, strict=True)
        ]
        instances = Instances((out_h, out_w))
        instances.pred_boxes = Boxes(phrase_boxes.cpu().reshape(-1, 4))
        instances.scores = phrase_scores.cpu()
        instances.pred_classes = torch.arange(len(phrases))
        instances.pred_phrases = np.array([p.text for p in grounded_phrases], dtype=object)
        return {
            "caption": caption,
            "caption_score": hypothesis.score,
            "caption_ended": hypothesis.ended,
            "caption_tokens": hypothesis.tokens,
            "caption_words": [GroundedSpan(w.text, w.span, box.tolist(), float(score))
                              for w, box, score in zip(words, word_boxes, word_scores, strict=True)],
            "caption_phrases": grounded_phrases,
            "instances": instances,
        }

    def _regions(self, index: int, token_ids: list[int]) -> tuple[Tensor, Tensor]:
        """Region-word logits (anchors, T) of the caption's tokens and every anchor's box, clipped
        to the network input as ATSS post-processing does."""
        model = self.model
        image = self.image.index_select(torch.tensor([index], device=self.images.tensor.device))
        tokens = torch.tensor([token_ids], device=self.images.tensor.device)
        mask = torch.ones_like(tokens)
        hidden = model.language_backbone(tokens, mask, causal=True)["hidden"]
        fused_text = model.fusion.decode_text(hidden, mask, image)
        predictions = model.head(image.features, fused_text)
        logits = torch.cat(predictions["logits"], dim=1)[0]
        deltas = torch.cat([r.permute(0, 2, 3, 1).reshape(-1, 4) for r in predictions["bbox_reg"]], dim=0)
        anchors = torch.cat(model.anchor_generator(image.features), dim=0)
        boxes = model.post_processor.box_coder.decode(deltas, anchors)
        height, width = self.images.image_sizes[index]
        upper = boxes.new_tensor([width - 1, height - 1, width - 1, height - 1])
        return logits, torch.minimum(boxes.clamp(min=0), upper)
