"""Detection evaluation of a grounding model: the dataset's vocabulary is the prompt.

The vocabulary is split into prompts that fit the token limit (or into fixed-size chunks, e.g. 40
categories per prompt as the paper's LVIS protocol), the model runs once per chunk, and each image's
detections are concatenated, as official GLIP does. Labels are the dataset's contiguous class ids,
so Detectron2's COCOEvaluator / LVISEvaluator read the output unchanged.
"""

from collections.abc import Sequence

from detectron2.structures import Instances
from torch import nn

from ..engine.predictor import build_prompt_chunks

PER_CAPTION_KEYS = ("caption", "label_to_tokens", "input_ids", "attention_mask")


class PromptedDetector(nn.Module):
    """Wraps a GLIPv2 model so that `inference_on_dataset` can call it on plain image dicts."""

    def __init__(self, model: nn.Module, class_names: Sequence[str], chunk_size: int = 0):
        super().__init__()
        self.model = model
        self.chunks = build_prompt_chunks(model.tokenizer, list(class_names), model.max_query_len, chunk_size)

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        plain = [{k: v for k, v in x.items() if k not in PER_CAPTION_KEYS} for x in batched_inputs]
        per_image: list[list[Instances]] = [[] for _ in plain]
        for chunk in self.chunks:
            prompted = [{**x, "caption": chunk.caption, "label_to_tokens": chunk.label_to_tokens} for x in plain]
            for parts, output in zip(per_image, self.model(prompted)):
                parts.append(output["instances"])
        return [{"instances": Instances.cat(parts) if len(parts) > 1 else parts[0]} for parts in per_image]
