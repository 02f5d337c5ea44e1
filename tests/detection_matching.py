"""Comparing two runs' detections that differ only by float rounding (e.g. prompts batched or not)."""

import math

import numpy as np
import torch
from detectron2.structures import Instances


def assert_same_detections(got: Instances, want: Instances) -> np.ndarray:
    """Equal detections up to float rounding (1e-5 relative; pasted masks up to a pixel in 10^5).
    Scores tied to ~1e-7 may trade places, so each detection is compared with the one of its class
    nearest to its box; returns that matching (index into ``want`` per detection of ``got``)."""
    assert len(got) == len(want) > 0
    distance = torch.cdist(got.pred_boxes.tensor.double(), want.pred_boxes.tensor.double(), p=math.inf)
    distance[got.pred_classes[:, None] != want.pred_classes[None, :]] = math.inf
    match = distance.argmin(dim=1)
    assert sorted(match.tolist()) == list(range(len(want))), "the detections do not pair up one to one"
    torch.testing.assert_close(got.pred_boxes.tensor, want.pred_boxes.tensor[match], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got.scores, want.scores[match], rtol=1e-5, atol=0.0)
    assert torch.equal(got.pred_classes, want.pred_classes[match])
    if want.has("pred_mask_probs"):
        torch.testing.assert_close(got.pred_mask_probs, want.pred_mask_probs[match], rtol=1e-5, atol=1e-6)
    if want.has("pred_masks"):  # a pixel whose probability sits on the paste threshold may flip
        assert (got.pred_masks != want.pred_masks[match]).float().mean() <= 1e-5
    return match.numpy()
