"""Greedy and beam search over a ``CaptionStepper``.

Every caption starts with [CLS] and ends at the end token ([SEP]), which is banned while fewer
than ``min_length`` tokens were generated (its log-probability set to -inf, not renormalised).
Beam search keeps ``beam_size`` live hypotheses per image: at each step the ``2 * beam_size`` best
extensions are read in score order; an end token ranked among the first ``beam_size`` closes a
hypothesis, the other extensions refill the live beams. An image is done once ``beam_size``
hypotheses are closed (transformers' ``early_stopping=True``); at ``max_length`` the live ones are
closed as they stand. The best closed hypothesis by ``sum(log p) / length ** length_penalty`` wins.
With one beam this is greedy search, token for token and score for score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .options import CaptionDecodingOptions
from .steppers import CaptionStepper

__all__ = ["CaptionHypothesis", "beam_search", "greedy_search"]


@dataclass
class CaptionHypothesis:
    """One image's caption: generated token ids ([CLS] and the end token left out), its ranking
    score and whether it ended with the end token (False: cut at max_length)."""

    tokens: list[int]
    score: float
    ended: bool


def _step_log_probs(stepper: CaptionStepper, head, tokens: Tensor, generated: int,
                    options: CaptionDecodingOptions) -> tuple[Tensor, Tensor]:
    logits = head.logits(stepper.step(tokens))
    log_probs = logits.log_softmax(dim=-1)
    if generated < options.min_length:
        log_probs[:, head.end_token_id] = float("-inf")
    return logits, log_probs


@torch.no_grad()
def greedy_search(
    stepper: CaptionStepper, head, options: CaptionDecodingOptions
) -> tuple[list[CaptionHypothesis], Tensor]:
    """The most likely token at every step. Returns each image's hypothesis and the step logits
    (B, steps, vocab) of its tokens (rows of an ended caption keep running on filler tokens)."""
    num_images = stepper.num_images
    device = stepper.images.tensor.device
    stepper.start(torch.arange(num_images, device=device))
    tokens = torch.full((num_images, 1), head.start_token_id, dtype=torch.long, device=device)
    ended = torch.zeros(num_images, dtype=torch.bool, device=device)
    lengths = torch.zeros(num_images, dtype=torch.long, device=device)
    totals = torch.zeros(num_images, device=device)
    step_logits = []
    for generated in range(options.max_length):
        logits, log_probs = _step_log_probs(stepper, head, tokens, generated, options)
        step_logits.append(logits)
        chosen = log_probs.argmax(dim=-1)
        totals += torch.where(ended, 0.0, log_probs.gather(1, chosen[:, None]).squeeze(1))
        lengths += (~ended).long()
        chosen = torch.where(ended, head.end_token_id, chosen)
        ended |= chosen == head.end_token_id
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        if ended.all():
            break
    hypotheses = []
    for row in range(num_images):
        length = int(lengths[row])
        generated = tokens[row, 1 : 1 + length].tolist()
        closed = bool(generated) and generated[-1] == head.end_token_id
        hypotheses.append(CaptionHypothesis(
            tokens=generated[:-1] if closed else generated,
            score=float(options.normalised_score(float(totals[row]), length)),
            ended=closed,
        ))
    return hypotheses, torch.stack(step_logits, dim=1)


@torch.no_grad()
def beam_search(stepper: CaptionStepper, head, options: CaptionDecodingOptions) -> list[CaptionHypothesis]:
    """``options.beam_size`` hypotheses per image (see the module docstring)."""
    num_images, beams = stepper.num_images, options.beam_size
    device = stepper.images.tensor.device
    stepper.start(torch.arange(num_images, device=device).repeat_interleave(beams))
    tokens = torch.full((num_images * beams, 1), head.start_token_id, dtype=torch.long, device=device)
    scores = torch.full((num_images, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live hypothesis per image until the first step branches
    scores = scores.view(-1)
    closed: list[list[CaptionHypothesis]] = [[] for _ in range(num_images)]
    done = [False] * num_images
    for generated in range(options.max_length):
        _, log_probs = _step_log_probs(stepper, head, tokens, generated, options)
        vocab = log_probs.shape[1]
        totals = (scores[:, None] + log_probs).view(num_images, beams * vocab)
        top_scores, top_index = totals.topk(min(2 * beams, totals.shape[1]), dim=1)
        rows, next_tokens, next_scores = [], [], []
        for image in range(num_images):
            live = [] if done[image] else _extend(
                image, beams, vocab, top_scores[image].tolist(), top_index[image].tolist(),
                tokens, head.end_token_id, generated + 1, options, closed[image],
            )
            done[image] = done[image] or len(closed[image]) >= beams
            if done[image]:
                live = []
            # filler rows keep the batch's shape; their scores stay -inf
            live += [(image * beams, head.end_token_id, float("-inf"))] * (beams - len(live))
            for row, token, score in live:
                rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
        if all(done):
            break
        index = torch.tensor(rows, device=device)
        stepper.reorder(index)
        tokens = torch.cat([tokens[index], torch.tensor(next_tokens, device=device)[:, None]], dim=1)
        scores = torch.tensor(next_scores, device=device)
    else:
        for image in range(num_images):
            if not done[image]:
                for beam in range(beams):
                    row = image * beams + beam
                    if torch.isfinite(scores[row]):
                        closed[image].append(CaptionHypothesis(
                            tokens[row, 1:].tolist(),
                            float(options.normalised_score(float(scores[row]), options.max_length)),
                            ended=False,
                        ))
    return [max(hypotheses, key=lambda h: h.score) for hypotheses in closed]


def _extend(image: int, beams: int, vocab: int, top_scores: list[float], top_index: list[int], tokens: Tensor,
            end_token_id: int, length: int, options: CaptionDecodingOptions,
            closed: list[CaptionHypothesis]) -> list[tuple[int, int, float]]:
    """Read one image's best extensions in order: close the hypotheses whose end token ranks among
    the first ``beams``, return up to ``beams`` live (row, token, score) extensions."""
    live = []
    for rank, (score, flat) in enumerate(zip(top_scores, top_index)):
        row, token = image * beams + flat // vocab, flat % vocab
        if score == float("-inf"):
            break
        if token == end_token_id:
            if rank < beams:
                closed.append(CaptionHypothesis(
                    tokens[row, 1:].tolist(), float(options.normalised_score(score, length)), ended=True
                ))
            continue
        live.append((row, token, score))
        if len(live) == beams:
            break
    return live
