"""Detection evaluation of a grounding model: the dataset's vocabulary is the prompt.

The vocabulary is split into prompts that fit the token limit (or into fixed-size chunks, e.g. 40
categories per prompt as the paper's LVIS protocol), the model runs once per chunk, and each image's
detections are concatenated, as official GLIP does. Labels are the dataset's contiguous class ids,
so Detectron2's COCOEvaluator / LVISEvaluator read the output unchanged.
"""

from collections.abc import Sequence

from detectron2.structures import Instances
from torch import nn

from ..structures import Prompt


class PromptedDetector(nn.Module):
    """Wraps a GLIPv2 model so that `inference_on_dataset` can call it on plain image dicts; the
    prompts are the vocabulary's chunks (``PromptBuilder.categories``), encoded once."""

    def __init__(self, model: nn.Module, prompts: Sequence[Prompt]):
        super().__init__()
        if not prompts:
            raise ValueError("PromptedDetector needs at least one prompt")
        self.model = model
        self.prompts = list(prompts)

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        per_image: list[list[Instances]] = [[] for _ in batched_inputs]
        for prompt in self.prompts:
            prompted = [{**x, "prompt": prompt} for x in batched_inputs]
            for parts, output in zip(per_image, self.model(prompted)):
                parts.append(output["instances"])
        return [{"instances": Instances.cat(parts) if len(parts) > 1 else parts[0]} for parts in per_image]
