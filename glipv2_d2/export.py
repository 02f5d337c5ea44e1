"""A GLIPv2 detector for one fixed prompt as a TorchScript file that runs with plain torch and
torchvision, without this package or Detectron2.

The text side is precomputed: the prompt's text-encoder states (before fusion, as the model reads
them) and its label -> token averaging matrix are constants of the file, so the exported graph is
image encoder + deep fusion + region-word head + ATSS decoding + NMS. Tracing fixes the input size:
the file takes one ``(3, H, W)`` float image in the model's INPUT.FORMAT (0..255, not normalised)
at the exported size and returns boxes ``(N, 4)`` xyxy in those pixels, scores ``(N,)`` and label
ids ``(N,)`` of the prompt, best first.

Why TorchScript and not ONNX: the fusion tower's modulated deformable convolution is
``torchvision.ops.deform_conv2d``, for which torchvision registers no ONNX symbolic (it has them for
nms, roi_align and roi_pool only), while a traced graph keeps it as the ``torchvision::deform_conv2d``
op. (torch 2.14's TorchScript-based ONNX exporter stops even earlier on this graph, with an internal
shape-inference assertion.) Loading the file therefore needs ``import torchvision`` (which registers
that op and ``torchvision::nms``) besides torch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .modeling.meta_arch import EncodedText, GLIPv2
from .modeling.postprocessing import Candidates, batch_label_token_matrices
from .structures import Prompt

__all__ = ["FixedPromptDetector", "export_torchscript"]


class FixedPromptDetector(nn.Module):
    """``model`` with ``prompt``'s text side frozen into buffers; forward(image) -> boxes, scores, labels."""

    def __init__(self, model: GLIPv2, prompt: Prompt):
        super().__init__()
        self.model = model.eval()
        with torch.no_grad():
            text = model.encode_text([prompt])
        label_ids, label_matrices, label_valid = batch_label_token_matrices(
            [prompt.label_to_tokens], text.mask.shape[1], model.device)
        self.register_buffer("text_hidden", text.hidden)
        self.register_buffer("text_mask", text.mask)
        self.register_buffer("token_categories", text.token_categories)
        self.register_buffer("label_ids", label_ids[0])
        self.register_buffer("label_matrices", label_matrices)
        self.register_buffer("label_valid", label_valid)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        model, post = self.model, self.model.post_processor
        images = model.preprocess_image([{"image": image}])
        text = EncodedText(self.text_hidden, self.text_mask, self.token_categories)
        outputs = model.run_network(images, text)
        anchors = model.anchor_generator(outputs.features)
        sizes = torch.tensor([image.shape[-2:]], dtype=torch.float32, device=image.device)
        per_level = [
            post.select_level(b, c, t, a, sizes, self.label_matrices, self.label_valid)
            for b, c, t, a in zip(outputs.bbox_reg, outputs.centerness, outputs.logits, anchors)
        ]
        detections: Candidates = post.cap(post.nms(Candidates.cat(per_level), len(self.label_ids)), 1)
        return detections.boxes, detections.scores, self.label_ids[detections.label_index]


def export_torchscript(model: GLIPv2, prompt: Prompt, example_image: Tensor, output: str | Path) -> dict:
    """Trace the detector on ``example_image`` (its size becomes the file's input size), save it to
    ``output`` with a JSON sidecar (``output`` + ".json": input size and format, label names) and
    return the sidecar's content."""
    detector = FixedPromptDetector(model, prompt)
    # The tracer warns at every Python number taken from a shape: those are constants of the fixed
    # input size, which tests/test_export.py checks on an image other than the traced one.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(detector, (example_image,), check_trace=False)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(output))
    info = {
        "input_size": list(example_image.shape[-2:]),
        "input_format": model.input_format,
        "prompt": prompt.caption,
        "label_names": {str(label): name for label, name in prompt.label_names.items()},
    }
    Path(f"{output}.json").write_text(json.dumps(info, indent=1))
    return info
