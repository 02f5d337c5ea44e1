"""Image(s) + prompt(s) -> grounded detections, the way users call GLIP outside training.

A prompt is either a list of category names (detection; vocabularies that exceed the token limit
are split into chunks, each run as its own prompt, and the detections merged per image, keeping
the best TEST.DETECTIONS_PER_IMAGE by score as official GLIP's chunked evaluation does) or a
free-form caption whose phrases are given as strings or character spans (grounding), or a tuned
prompt (prompt tuning's file, ``prompt_file=``), read without running the text encoder.
``caption`` / ``caption_batch`` generate grounded captions with a captioning model (a CaptionHead).
"""

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import Instances

from ..checkpoint import GLIPv2Checkpointer
from ..config import check_device_available
from ..data.image_io import array_to_bgr, read_image
from ..data.prompt_builder import PromptBuilder
from ..data.transforms import build_test_resize
from ..evaluation.prompted_inference import merge_chunk_detections
from ..modeling.prompt_file import check_same_prompt, load_prompt_file
from ..structures import Prompt
from .answering import answer_questions

ImageInput = str | Path | np.ndarray
PromptInput = str | Sequence[str]


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
        """``batch_size``: images per backbone pass; an image's prompts (a long vocabulary's chunks)
        share its pass and run through the fusion tower in groups within TEST.FUSION_BATCH_MEMORY_MB."""
        check_device_available(cfg)
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        if cfg.MODEL.WEIGHTS:
            GLIPv2Checkpointer(self.model, strict=True, trust_pickle=cfg.MODEL.TRUST_PICKLED_WEIGHTS).load(
                cfg.MODEL.WEIGHTS
            )
        self.resize = build_test_resize(cfg)
        self.batch_size = batch_size
        self.prompt_builder = PromptBuilder(cfg, self.model.tokenizer)
        self._tuned_prompts: dict[tuple[str, float | None], Prompt] = {}

    def __call__(self, image: ImageInput, prompt: PromptInput | Prompt | None = None,
                 phrases: Sequence[str] | None = None, spans: Sequence | None = None, input_format: str = "BGR",
                 prompt_file: str | Path | None = None) -> Instances | list[Instances]:
        """``prompt_file``: read the image with that tuned prompt (see ``with_tuned_prompt``).
        A list of ``Prompt`` objects (e.g. two captions) gives a list of Instances, one per prompt,
        all from one backbone pass (see ``predict_prompts``)."""
        if _is_prompt_list(prompt):
            if phrases is not None or spans is not None or prompt_file is not None:
                raise ValueError("a list of Prompt objects takes no phrases, spans or prompt_file")
            return self.predict_prompts(image, prompt, input_format)
        prompts = self.build_prompts(self.with_tuned_prompt(prompt, prompt_file), phrases, spans)
        return self._predict([self.load_image(image, input_format)], [prompts])[0]

    def predict_prompts(self, image: ImageInput, prompts: Sequence[Prompt], input_format: str = "BGR",
                        ) -> list[Instances]:
        """One image read with several independent prompts (built with ``build_prompts``, tuned,
        ...): one Instances per prompt in that prompt's own labels, each cut to
        TEST.DETECTIONS_PER_IMAGE. The backbone runs once and the prompts go through the fusion
        tower together, within TEST.FUSION_BATCH_MEMORY_MB."""
        if not _is_prompt_list(prompts):
            raise TypeError(f"predict_prompts takes a non-empty list of Prompt objects, got {prompts!r}")
        model_input = self._model_input(self.load_image(image, input_format), None)
        parts = self.model.inference_over_prompt_lists([model_input], [list(prompts)])[0]
        return [self._merge([part], [prompt]) for part, prompt in zip(parts, prompts, strict=True)]

    def with_tuned_prompt(self, prompt: PromptInput | Prompt | None, prompt_file: str | Path | None = None):
        """The tuned prompt of ``prompt_file``, else of TEST.PROMPT_FILE for a category list or no
        prompt (as evaluation reads a vocabulary with it), else ``prompt`` itself. A category list
        given with a prompt file must be the one it was tuned on."""
        is_categories = prompt is not None and not isinstance(prompt, (str, Prompt))
        if prompt_file is not None and isinstance(prompt, str):
            raise ValueError("a caption and a prompt file: give one of them")
        path = prompt_file or (self.cfg.TEST.PROMPT_FILE if prompt is None or is_categories else None)
        if not path:
            if prompt is None:
                raise ValueError("no prompt: give categories, a caption or a prompt_file (or set TEST.PROMPT_FILE)")
            return prompt
        tuned = self.tuned_prompt(path)
        if is_categories:
            check_same_prompt(tuned, self.build_prompts(prompt)[0], f"prompt file {path}", "the call")
        return tuned

    def tuned_prompt(self, path: str | Path) -> Prompt:
        """The tuned prompt of a prompt file, checked against this model and read once per file
        version: one loaded model serves every task's prompt file."""
        key = (str(path), os.path.getmtime(path) if os.path.isfile(path) else None)
        if key not in self._tuned_prompts:
            self._tuned_prompts[key] = load_prompt_file(path, self.model)
        return self._tuned_prompts[key]

    def predict_batch(self, images: Sequence[ImageInput], prompts: Sequence[PromptInput | Prompt],
                      input_format: str = "BGR") -> list[Instances]:
        """Several images, each with its own prompt (category list, caption or ``tuned_prompt``; a
        category list is read with TEST.PROMPT_FILE's tuned prompt when one is set)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        built = [self.build_prompts(self.with_tuned_prompt(p)) for p in prompts]
        return self._predict([self.load_image(im, input_format) for im in images], built)

    def build_prompts(self, prompt: PromptInput | Prompt, phrases: Sequence[str] | None = None,
                      spans: Sequence | None = None) -> list[Prompt]:
        """Category list -> one prompt per chunk that fits the token limit (labels are the list
        indices; a repeated name is prompted once, with a warning); caption -> one prompt whose
        labels are its phrases (given as text or spans); a ``Prompt`` (e.g. a tuned one) as it is."""
        if isinstance(prompt, Prompt):
            return [prompt]
        if isinstance(prompt, str):
            return [self.prompt_builder.caption(prompt, phrases=phrases, spans=spans)]
        if not isinstance(prompt, Iterable):
            raise TypeError(f"prompt must be a caption string or a list of category names, got {prompt!r}")
        if phrases is not None or spans is not None:
            raise ValueError("phrases and spans locate entities in a caption; a category list takes neither")
        names = list(prompt)
        if not names:
            raise ValueError("empty prompt: the category list has no names")
        return self.prompt_builder.categories(names)

    def load_image(self, image: ImageInput, input_format: str = "BGR") -> np.ndarray:
        """A path or array -> the HxWx3 uint8 BGR image the predictor feeds the model."""
        if isinstance(image, (str, Path)):
            return read_image(image, format="BGR")
        return array_to_bgr(image, input_format)

    def caption(self, image: ImageInput, input_format: str = "BGR", **decoding) -> dict:
        """One image's generated caption: see ``caption_batch``."""
        return self.caption_batch([image], input_format, **decoding)[0]

    @torch.no_grad()
    def caption_batch(
        self,
        images: Sequence[ImageInput],
        input_format: str = "BGR",
        *,
        beam_size: int | None = None,
        max_length: int | None = None,
        min_length: int | None = None,
        length_penalty: float | None = None,
        use_cache: bool | None = None,
    ) -> list[dict]:
        """Caption every image (cfg.MODEL.CAPTION's decoding unless overridden here; invalid options
        raise ValueError before any image is read). Each result: "caption", "caption_score",
        "caption_ended", "caption_tokens", "caption_words" / "caption_phrases" (grounded with a
        box in input-image pixels and a score each) and "instances" (one box per phrase, with
        pred_phrases), as ``glipv2_d2.modeling.caption.generate`` describes."""
        head = self.model.task_heads["CaptionHead"] if "CaptionHead" in self.model.task_heads else None
        if head is None:
            raise ValueError("this model has no CaptionHead (MODEL.GLIPV2.TASK_HEADS): it cannot caption")
        options = head.options.updated(
            beam_size=beam_size, max_length=max_length, min_length=min_length, length_penalty=length_penalty
        )
        results = []
        for start in range(0, len(images), self.batch_size):
            inputs = [self._model_input(self.load_image(image, input_format), None)
                      for image in images[start:start + self.batch_size]]
            results += self.model.generate_captions(inputs, options, use_cache)
        for result in results:
            result["instances"] = result["instances"].to("cpu")
        return results

    def answer(self, image: ImageInput, question: str, phrases: Sequence[str] | None = None,
               input_format: str = "BGR") -> dict:
        """Answer a question about one image with a VQA model (a VQAHead): "answer", "score", "topk"
        and "instances" (boxes of the listed phrases of the question and, with MODEL.VQA.GROUNDED, of
        the answer), see ``glipv2_d2.engine.answering``. An empty or too long question is a ValueError."""
        return self.answer_batch([image], [question], [phrases], input_format)[0]

    def answer_batch(self, images: Sequence[ImageInput], questions: Sequence[str],
                     phrases: Sequence[Sequence[str] | None] | None = None, input_format: str = "BGR") -> list[dict]:
        """Several images, each with its own question (and optionally phrases of it to ground)."""
        return answer_questions(self, [self.load_image(image, input_format) for image in images], questions, phrases)

    def _model_input(self, image: np.ndarray, prompt: Prompt | None) -> dict:
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        if self.model.input_format == "RGB":
            resized = resized[:, :, ::-1]
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        model_input = {"image": tensor, "height": height, "width": width}
        return model_input if prompt is None else {**model_input, "prompt": prompt}

    @torch.no_grad()
    def _predict(self, images: list[np.ndarray], prompts_per_image: list[list[Prompt]]) -> list[Instances]:
        """``batch_size`` images per backbone pass, each read with all its prompts in one call
        (``GLIPv2.inference_over_prompt_lists``: the prompts share the image's backbone levels and go
        through the fusion tower together), then each image's detections merged."""
        results = []
        for start in range(0, len(images), self.batch_size):
            batch = range(start, min(start + self.batch_size, len(images)))
            inputs = [self._model_input(images[i], None) for i in batch]
            per_image = self.model.inference_over_prompt_lists(inputs, [prompts_per_image[i] for i in batch])
            results += [self._merge(parts, prompts_per_image[i]) for i, parts in zip(batch, per_image, strict=True)]
        return results

    def _merge(self, parts: list[Instances], prompts: list[Prompt]) -> Instances:
        """One image's detections of all its prompts, cut to TEST.DETECTIONS_PER_IMAGE, finished
        (masks pasted) and named."""
        parts = [part.to("cpu") for part in parts]
        merged = self.model.finish_instances(merge_chunk_detections(parts, self.cfg.TEST.DETECTIONS_PER_IMAGE))
        names = {label: name for prompt in prompts for label, name in prompt.label_names.items()}
        merged.pred_phrases = np.array([names[int(c)] for c in merged.pred_classes], dtype=object)
        return merged


def _is_prompt_list(prompt: object) -> bool:
    """A non-empty list or tuple of ``Prompt`` objects (a list of strings is a category list)."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(p, Prompt) for p in prompt)
