"""Detection evaluation of a grounding model: the dataset's vocabulary is the prompt.

The vocabulary is split into prompts that fit the token limit (or into fixed-size chunks, e.g. 40
categories per prompt as the paper's LVIS protocol), the model reads each image with every chunk, and
each image's detections are concatenated, as official GLIP does (which runs the whole model once per
chunk; here the backbone runs once per image and the chunks go through the fusion tower as batches,
see ``GLIPv2.inference_over_prompt_lists``). Labels are the dataset's contiguous class ids,
so Detectron2's COCOEvaluator / LVISEvaluator read the output unchanged.

Each chunk keeps the model's own per-image cap (MODEL.ATSS.DETECTIONS_PER_IMG), so n chunks give up
to n times as many boxes. Official GLIP cuts the merged list again: its LVIS evaluation keeps the
best 300 of an image by score over all chunks (the evaluator's max_dets), and its fixed-AP protocol
keeps every box (top 10,000 per category over the split instead). `merge_chunk_detections` is that
cut, with the cap given by the caller (TEST.DETECTIONS_PER_IMAGE, Detectron2's key for it): the
predictor applies it. The trainer's evaluation leaves it to the evaluator, which already makes the
same cut (LVISEvaluator's max_dets_per_image is TEST.DETECTIONS_PER_IMAGE; fixed AP passes -1).
"""

from collections.abc import Sequence

from detectron2.structures import Instances
from torch import nn

from ..structures import Prompt

__all__ = ["PromptedDetector", "merge_chunk_detections"]


def merge_chunk_detections(parts: Sequence[Instances], max_per_image: int | None) -> Instances:
    """One image's detections from every chunk of a vocabulary: concatenated, then, when there are
    several chunks and more than `max_per_image` boxes, the best `max_per_image` by score (ties
    broken by chunk order). A single chunk is returned as the model gave it (already capped by
    MODEL.ATSS.DETECTIONS_PER_IMG); `max_per_image` None or negative keeps every box."""
    if not parts:
        raise ValueError("merge_chunk_detections needs the detections of at least one chunk")
    if len(parts) == 1:
        return parts[0]
    merged = Instances.cat(list(parts))
    if max_per_image is None or max_per_image < 0 or len(merged) <= max_per_image:
        return merged
    order = merged.scores.argsort(descending=True, stable=True)
    return merged[order[:max_per_image]]


class PromptedDetector(nn.Module):
    """Wraps a GLIPv2 model so that `inference_on_dataset` can call it on plain image dicts; the
    prompts are the vocabulary's chunks (``PromptBuilder.categories``), encoded once. An image's
    merged detections are cut to `max_detections_per_image` (None: every box, as fixed AP needs).
    Output-size fields (pasted masks) are made after the cut, so that 31 LVIS chunks never hold
    their full-image masks at once; the backbone runs once per batch for all chunks, which go through
    the fusion tower in groups within TEST.FUSION_BATCH_MEMORY_MB."""

    def __init__(self, model: nn.Module, prompts: Sequence[Prompt], max_detections_per_image: int | None = None):
        super().__init__()
        if not prompts:
            raise ValueError("PromptedDetector needs at least one prompt")
        self.model = model
        self.prompts = list(prompts)
        self.max_detections_per_image = max_detections_per_image

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        per_image = self.model.inference_over_prompts(batched_inputs, self.prompts)
        return [
            {"instances": self.model.finish_instances(merge_chunk_detections(parts, self.max_detections_per_image))}
            for parts in per_image
        ]
