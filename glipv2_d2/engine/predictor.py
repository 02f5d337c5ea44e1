"""Image(s) + prompt(s) -> grounded detections, the way users call GLIP outside training.

A prompt is either a list of category names (detection; vocabularies that exceed the token limit
are split into chunks, each run as its own prompt, and the detections merged per image) or a
free-form caption whose phrases are given as strings or character spans (grounding).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import Instances
from transformers import PreTrainedTokenizerBase

from ..checkpoint import GLIPv2Checkpointer
from ..data.image_io import array_to_bgr, read_image
from ..data.prompts import (
    chunk_categories,
    detection_query,
    locate_phrases,
    spans_to_token_map,
    tokenize_prompts,
)
from ..data.transforms import build_test_resize

ImageInput = str | Path | np.ndarray
PromptInput = str | Sequence[str]


@dataclass
class PromptChunk:
    """One text the model reads, with the label ids its tokens stand for."""

    caption: str
    label_to_tokens: dict[int, list[int]]
    label_names: dict[int, str]


def build_prompt_chunks(
    tokenizer: PreTrainedTokenizerBase,
    prompt: PromptInput,
    max_len: int,
    chunk_size: int = 0,
    phrases: Sequence[str] | None = None,
    spans: Sequence | None = None,
) -> list[PromptChunk]:
    """Category list -> one chunk per group that fits `max_len` tokens; caption -> one chunk.

    Category labels are their indices in the list; caption labels are the phrase indices.
    """
    if isinstance(prompt, str):
        num_tokens = len(tokenizer(prompt)["input_ids"])
        if num_tokens > max_len:
            raise ValueError(
                f"caption of {num_tokens} tokens exceeds the {max_len}-token limit: {prompt[:80]!r}...; "
                "shorten it or pass its phrases as a category list, which is chunked"
            )
        located = locate_phrases(prompt, phrases=phrases, spans=spans)
        tokenized = tokenize_prompts(tokenizer, [prompt], max_len)
        spans_per_label = {i: phrase_spans for i, (_, phrase_spans) in enumerate(located)}
        token_map = spans_to_token_map(tokenized, spans_per_label, max_len, caption=prompt)
        return [PromptChunk(prompt, token_map, {i: text for i, (text, _) in enumerate(located)})]
    names = list(prompt)
    if not names:
        raise ValueError("empty prompt: the category list has no names")
    chunks = chunk_categories(names, tokenizer, max_len=max_len, chunk_size=chunk_size or None)
    result = []
    for chunk in chunks:
        caption, _, token_map = detection_query(tokenizer, chunk, max_len=max_len)
        result.append(PromptChunk(caption, token_map, {label: names[label] for label, _ in chunk}))
    return result


class GLIPv2Predictor:
    """Build a GLIPv2 model from `cfg`, load cfg.MODEL.WEIGHTS, and run it on images with prompts.

    MODEL.WEIGHTS may be a converted file or an official GLIP checkpoint; either must match the
    model key for key.

    Inputs are image paths or numpy arrays (BGR like Detectron2's DefaultPredictor, unless
    `input_format="RGB"`); every image may have its own prompt. Outputs are Instances in the
    input image's pixels with pred_boxes, scores, pred_classes (the label ids of the prompt) and
    pred_phrases (the category name or phrase of each box).
    """

    def __init__(self, cfg: CfgNode, batch_size: int = 1):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        if cfg.MODEL.WEIGHTS:
            GLIPv2Checkpointer(self.model, strict=True).load(cfg.MODEL.WEIGHTS)
        self.resize = build_test_resize(cfg)
        self.batch_size = batch_size
        self.max_len = cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN
        self.chunk_size = cfg.TEST.PROMPT_CHUNK_SIZE

    def __call__(self, image: ImageInput, prompt: PromptInput, phrases: Sequence[str] | None = None,
                 spans: Sequence | None = None, input_format: str = "BGR") -> Instances:
        chunks = build_prompt_chunks(self.model.tokenizer, prompt, self.max_len, self.chunk_size, phrases, spans)
        return self._predict([self.load_image(image, input_format)], [chunks])[0]

    def predict_batch(self, images: Sequence[ImageInput], prompts: Sequence[PromptInput],
                      input_format: str = "BGR") -> list[Instances]:
        """Several images, each with its own prompt (category list or caption)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        chunks = [build_prompt_chunks(self.model.tokenizer, p, self.max_len, self.chunk_size) for p in prompts]
        return self._predict([self.load_image(im, input_format) for im in images], chunks)

    def load_image(self, image: ImageInput, input_format: str = "BGR") -> np.ndarray:
        """A path or array -> the HxWx3 uint8 BGR image the predictor feeds the model."""
        if isinstance(image, (str, Path)):
            return read_image(image, format="BGR")
        return array_to_bgr(image, input_format)

    def _model_input(self, image: np.ndarray, chunk: PromptChunk) -> dict:
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        if self.model.input_format == "RGB":
            resized = resized[:, :, ::-1]
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": height, "width": width, "caption": chunk.caption,
                "label_to_tokens": chunk.label_to_tokens}

    @torch.no_grad()
    def _predict(self, images: list[np.ndarray], chunks_per_image: list[list[PromptChunk]]) -> list[Instances]:
        jobs = [(i, chunk) for i, chunks in enumerate(chunks_per_image) for chunk in chunks]
        per_image: list[list[Instances]] = [[] for _ in images]
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start:start + self.batch_size]
            outputs = self.model([self._model_input(images[i], chunk) for i, chunk in batch])
            for (i, _), output in zip(batch, outputs):
                per_image[i].append(output["instances"].to("cpu"))
        results = []
        for parts, chunks in zip(per_image, chunks_per_image):
            merged = Instances.cat(parts) if len(parts) > 1 else parts[0]
            names = {label: name for chunk in chunks for label, name in chunk.label_names.items()}
            merged.pred_phrases = np.array([names[int(c)] for c in merged.pred_classes], dtype=object)
            results.append(merged)
        return results
