"""GLIPv2's VQA head ("VQAHead" in MODEL.GLIPV2.TASK_HEADS): answers from the fused question.

The image and the question go through the whole model; the fused text features P (the question's
tokens after every fusion layer, so they have read the image) are pooled into one vector, which a
2-layer MLP with GELU and a linear classifier turn into one logit per answer of the vocabulary
(GLIPv2 section 3.3 and appendix D.2). Pooling is attention pooling by default (a linear score
per token, softmax over the real tokens only, weighted sum); MODEL.VQA.POOLING "first_token"
classifies the start-of-sequence token instead, as the paper's main text describes.

Loss: binary cross-entropy against soft scores, summed over the answers and averaged over the
questions (BUTD's and VinVL's ``bce_with_logits`` x vocabulary size), so its scale does not shrink
with the vocabulary. Inputs without "vqa_targets" (e.g. detection data mixed into training) add
nothing. Grounded VQA needs nothing here: the [MASK] token the data appends is grounded by the
model's region-word losses and returns boxes like any phrase.

Contract: training reads "vqa_targets", a ``(MODEL.VQA.NUM_ANSWERS,)`` float tensor of soft
scores in [0, 1], from each input dict; inference returns per image ``{"vqa": {"answer",
"score", "answer_id", "topk": [{"answer", "score"}, ...]}}`` (scores are sigmoid probabilities).
The answer strings come from MODEL.VQA.ANSWER_VOCAB_FILE, read at the first inference (so a
training stage may write the file when it first loads its data).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from ..data.vqa_answers import AnswerVocabulary
from .task_heads import TASK_HEAD_REGISTRY, GroundedTaskHead, TaskHeadInputs

__all__ = ["POOLINGS", "VQAHead", "pool_text"]

POOLINGS = ("attention", "first_token")


def pool_text(text: Tensor, text_mask: Tensor, token_scores: Tensor | None) -> Tensor:
    """``(B, D)`` one vector per question: the softmax-weighted sum of the real tokens (padding
    gets weight exactly 0) for ``(B, T)`` ``token_scores``, or the first token without them."""
    if token_scores is None:
        return text[:, 0]
    scores = token_scores.float().masked_fill(text_mask == 0, float("-inf"))
    weights = torch.softmax(scores, dim=1).to(text.dtype)
    return torch.einsum("bt,btd->bd", weights, text)


@TASK_HEAD_REGISTRY.register()
class VQAHead(GroundedTaskHead):
    """Pooling (``attention``, a linear scorer), ``mlp`` (two linear + GELU layers) and
    ``classifier`` (one logit per answer); see the module docstring."""

    def __init__(self, cfg: CfgNode, input_shape: Sequence[ShapeSpec], text_dim: int):
        super().__init__()
        vqa = cfg.MODEL.VQA
        if vqa.POOLING not in POOLINGS:
            raise ValueError(f"MODEL.VQA.POOLING must be one of {POOLINGS}, got {vqa.POOLING!r}")
        if vqa.NUM_ANSWERS < 1:
            raise ValueError(f"MODEL.VQA.NUM_ANSWERS must be positive, got {vqa.NUM_ANSWERS}")
        hidden = vqa.HIDDEN_DIM or text_dim
        self.attention = nn.Linear(text_dim, 1) if vqa.POOLING == "attention" else None
        self.mlp = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
        self.classifier = nn.Linear(hidden, vqa.NUM_ANSWERS)
        self.num_answers = vqa.NUM_ANSWERS
        self.loss_weight = vqa.LOSS_WEIGHT
        self.top_k = vqa.TOP_K
        self.vocabulary_file = vqa.ANSWER_VOCAB_FILE
        self._vocabulary: AnswerVocabulary | None = None

    @property
    def vocabulary(self) -> AnswerVocabulary:
        """The answer strings, read from MODEL.VQA.ANSWER_VOCAB_FILE on first use."""
        if self._vocabulary is None:
            if not self.vocabulary_file:
                raise ValueError("MODEL.VQA.ANSWER_VOCAB_FILE is empty: VQAHead needs the answer vocabulary "
                                 "to name its answers (tools/build_vqa_vocab.py writes it)")
            vocabulary = AnswerVocabulary.load(self.vocabulary_file)
            if len(vocabulary) != self.num_answers:
                raise ValueError(f"MODEL.VQA.ANSWER_VOCAB_FILE {self.vocabulary_file!r} has {len(vocabulary)} "
                                 f"answers but MODEL.VQA.NUM_ANSWERS is {self.num_answers}")
            self._vocabulary = vocabulary
        return self._vocabulary

    def answer_logits(self, text: Tensor, text_mask: Tensor) -> Tensor:
        """``(B, NUM_ANSWERS)`` logits of fused text ``(B, T, D)`` with its ``(B, T)`` real-token mask."""
        scores = None if self.attention is None else self.attention(text).squeeze(-1)
        return self.classifier(self.mlp(pool_text(text, text_mask, scores)))

    def losses(self, inputs: TaskHeadInputs) -> dict[str, Tensor]:
        rows = [i for i, x in enumerate(inputs.batched_inputs) if "vqa_targets" in x]
        if not rows:
            return {"loss_vqa": sum(p.sum() for p in self.parameters()) * 0.0}
        targets = torch.stack([self._targets_of(inputs.batched_inputs[i], i) for i in rows]).to(inputs.text.device)
        index = torch.tensor(rows, device=inputs.text.device)
        logits = self.answer_logits(inputs.text[index], inputs.text_mask[index]).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="sum") / len(rows)
        return {"loss_vqa": loss * self.loss_weight}

    def inference(self, inputs: TaskHeadInputs) -> list[dict]:
        probs = self.answer_logits(inputs.text, inputs.text_mask).float().sigmoid().cpu()
        scores, ids = probs.topk(min(self.top_k, self.num_answers), dim=1)
        answers = self.vocabulary.answers
        outputs = []
        for image_scores, image_ids in zip(scores.tolist(), ids.tolist()):
            topk = [{"answer": answers[i], "score": s} for i, s in zip(image_ids, image_scores)]
            outputs.append({"vqa": {"answer": topk[0]["answer"], "score": topk[0]["score"],
                                    "answer_id": image_ids[0], "topk": topk}})
        return outputs

    def _targets_of(self, x: dict, index: int) -> Tensor:
        targets = torch.as_tensor(x["vqa_targets"])
        if targets.shape != (self.num_answers,):
            raise ValueError(
                f"input {index}: 'vqa_targets' has shape {tuple(targets.shape)}, expected ({self.num_answers},) "
                "= MODEL.VQA.NUM_ANSWERS soft scores"
            )
        return targets
