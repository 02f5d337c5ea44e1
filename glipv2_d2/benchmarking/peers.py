"""Peer detectors that tools/benchmark.py times beside GLIPv2 (``--peer``), built from configs only.

A peer takes the benchmark's own inputs (uint8 images at the network input size, each with the
GLIPv2 prompt of the 80 COCO names) and returns ``{"instances": ...}`` per image as GLIPv2 does, so
the same timing loop, precisions and memory measure apply to both models. Weights are random and
nothing is fetched from a hub: the numbers are speed only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

DETECTIONS_PER_IMAGE = 100
# Grounding DINO's image processor: rescale to [0, 1], then normalise with the ImageNet RGB statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def grounding_dino_config() -> GroundingDinoConfig:
    """Grounding DINO-T as released (Swin-T backbone, bert-base-uncased text encoder), with every part
    built from a local config so that construction never reaches a hub: both sub-configs are given
    explicitly and no pretrained backbone is asked for (transformers 4.x reads the two flags; 5.x
    has no timm/pretrained-backbone path and ignores them)."""
    return GroundingDinoConfig(
        backbone_config=SwinConfig(out_indices=[2, 3, 4]),  # SwinConfig's defaults are Swin-T
        text_config=BertConfig(),  # BertConfig's defaults are bert-base(-uncased) sized
        use_timm_backbone=False,
        use_pretrained_backbone=False,
    )


# The config each --peer builds; tests replace an entry with a tiny config to run in seconds.
PEER_CONFIGS: dict[str, Callable[[], GroundingDinoConfig]] = {"grounding-dino": grounding_dino_config}


def top_detections(logits: Tensor, boxes: Tensor, height: int, width: int,
                   k: int = DETECTIONS_PER_IMAGE) -> tuple[Tensor, Tensor, Tensor]:
    """The k best queries per image, the minimal selection a detector output needs before use.

    logits: (B, Q, L) region-word logits (-inf past the prompt); boxes: (B, Q, 4) normalised cxcywh.
    Returns scores (B, k) = max over tokens of the sigmoid, the best token (B, k), and boxes (B, k, 4)
    as xyxy pixels clipped to the image (GLIPv2's post-processing clips its boxes too).
    """
    scores, tokens = logits.sigmoid().max(dim=-1)
    scores, index = scores.topk(min(k, scores.shape[1]), dim=1)
    cx, cy, w, h = boxes.gather(1, index[..., None].expand(-1, -1, 4)).float().unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).clamp(0, 1)
    return scores, tokens.gather(1, index), xyxy * xyxy.new_tensor([width, height, width, height])


class GroundingDinoPeer(nn.Module):
    """Hugging Face's GroundingDinoForObjectDetection behind GLIPv2's inference interface.

    What one call does, and the benchmark times: stack the uint8 images, copy them to the device,
    rescale and normalise them; pad the prompts' token ids (GLIPv2's own tokenization, the same
    bert-base-uncased vocabulary) and copy them to the device; the detector's forward (Swin-T,
    BERT, feature enhancer, 6+6 layer deformable encoder/decoder over 900 queries); then
    ``top_detections`` (100 per image). GLIPv2's timed call does the same steps around its own
    network and post-processing (ATSS decoding, NMS, at most 100 detections per image), so the two times
    compare one detection pass each. Not timed on either side: tokenizing the prompt (done once by
    the benchmark) and resizing the image (the inputs are already at the network size).
    """

    def __init__(self, config: GroundingDinoConfig, detections_per_image: int = DETECTIONS_PER_IMAGE):
        super().__init__()
        self.detector = GroundingDinoForObjectDetection(config)
        self.detections_per_image = detections_per_image
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        """Inputs as GLIPv2's ("image": (3, H, W) uint8, "prompt": Prompt), one size per batch."""
        device = self.pixel_mean.device
        images = torch.stack([x["image"] for x in batched_inputs]).to(device)
        pixels = (images.float() / 255 - self.pixel_mean) / self.pixel_std
        check_enough_positions(self.detector.config, *images.shape[-2:])
        input_ids = pad_sequence([x["prompt"].input_ids for x in batched_inputs], batch_first=True).to(device)
        mask = pad_sequence([x["prompt"].attention_mask for x in batched_inputs], batch_first=True).to(device)
        outputs = self.detector(pixel_values=pixels, input_ids=input_ids, attention_mask=mask)
        height, width = pixels.shape[-2:]
        scores, tokens, boxes = top_detections(outputs.logits, outputs.pred_boxes, height, width,
                                               self.detections_per_image)
        return [
            {"instances": Instances((height, width), pred_boxes=Boxes(b), scores=s, pred_classes=t)}
            for b, s, t in zip(boxes, scores, tokens)
        ]


def check_enough_positions(config: GroundingDinoConfig, height: int, width: int) -> None:
    """Grounding DINO picks its queries among the encoder's image positions (top-k over them), so an
    image with fewer positions than ``num_queries`` cannot run; say so instead of torch's
    "selected index k out of range"."""
    backbone = config.backbone_config
    strides = [backbone.patch_size * 2 ** (i - 1) for i in backbone.out_indices]
    strides += [strides[-1] * 2 ** (k + 1) for k in range(config.num_feature_levels - len(strides))]
    positions = sum(math.ceil(height / s) * math.ceil(width / s) for s in strides)
    if positions < config.num_queries:
        raise ValueError(f"--peer grounding-dino: a {height}x{width} image gives {positions} image positions, fewer "
                         f"than its {config.num_queries} queries; use a larger --height / --width")


def build_peer(name: str, device: str, seed: int = 0) -> nn.Module:
    """The named peer with seeded random weights, in eval mode on ``device``."""
    torch.manual_seed(seed)
    return GroundingDinoPeer(PEER_CONFIGS[name]()).eval().to(device)


def compare_with_glipv2(name: str, timing: dict, glipv2_row: dict, inputs: list[dict]) -> dict:
    """The peer's timing row (tools/benchmark.py's ``time_precision``) beside GLIPv2's at the same
    precision: ratio = peer / GLIPv2 median ms per batch (above 1: the peer is slower)."""
    return {"model": name, **timing, "prompt_tokens": len(inputs[0]["prompt"].input_ids),
            "glipv2_ms_per_batch_median": glipv2_row["ms_per_batch_median"],
            "ratio_to_glipv2": timing["ms_per_batch_median"] / glipv2_row["ms_per_batch_median"]}


def comparison_table(peer_rows: list[dict]) -> str:
    """Markdown: per precision, both models' median ms per batch and the ratio."""
    lines = ["| precision | batch | prompt tokens | GLIPv2 ms/batch (median) | peer | peer ms/batch (median) "
             "| peer images/s | peer / GLIPv2 |", "|" + "---|" * 8]
    for r in peer_rows:
        cells = [r["precision"], r["batch_size"], r["prompt_tokens"], f"{r['glipv2_ms_per_batch_median']:.1f}",
                 r["model"], f"{r['ms_per_batch_median']:.1f}", f"{r['images_per_s']:.2f}",
                 f"{r['ratio_to_glipv2']:.2f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)
