"""The GLIPv2 meta-architecture: encoders, deep fusion, region-word head, post-processing, task heads.

Every input dict carries its own ``Prompt`` (tokenized by the data side), so one batch can mix
prompts; the text encoder runs once per DISTINCT prompt of the batch, and prompts are padded to the
batch's longest one unless MODEL.LANGUAGE_BACKBONE.PAD_MAX asks for the official fixed length.
Components build themselves from the config and the shapes of what feeds them, as Detectron2's dense
detectors do: strides and widths come from the backbone, never from keys that restate it.

Caption mode (MODEL.CAPTION_ON, or ``caption_mode=`` per call) runs the same network with the text
read causally and the image blind to it (paper app. D.2): training adds the CaptionHead's
next-token loss to the grounding losses of the images that carry boxes, inference generates
captions (``generate_captions``). L_inter and L_mlm are not computed in caption mode.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage, has_event_storage
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from ..structures import NO_CATEGORY, Prompt
from .anchor_generator import LegacyAnchorGenerator
from .caption.generate import generate_captions
from .caption.options import CaptionDecodingOptions
from .compiled_fusion import CompiledFusion
from .dense_head import GroundingPredictionHead
from .fusion import build_fusion
from .inter_image_loss import InterImageContrastiveLoss, RegionWordLabels
from .language import build_language_backbone, build_tokenizer
from .language.build import resolve_text_model_path
from .losses import GroundingATSSLoss
from .mlm import MaskedLanguageModelingHead, MaskingVocabulary, load_pretrained_mlm_head, mask_tokens
from .postprocessing import ATSSPostProcessor
from .prompt_batching import FusionBatchBudget, PromptPair
from .task_heads import TaskHeadInputs, build_task_heads


@dataclass
class EncodedText:
    """Text of a batch after the text encoder, one row per image (rows of a shared prompt alias)."""

    hidden: Tensor  # (B, T, H) last-layer states fed to the fusion tower
    mask: Tensor  # (B, T) 1 on real tokens
    token_categories: Tensor  # (B, T) category uid of each token, NO_CATEGORY elsewhere
    mlm_labels: Tensor | None = None  # (B, T) original ids of MLM-corrupted tokens, -100 elsewhere

    def rows(self, index: Sequence[int], length: int) -> "EncodedText":
        """The rows ``index`` (repeats allowed) cut to their first ``length`` tokens: a group of
        prompts encoded with longer ones needs no more padding than its own longest."""
        rows = torch.tensor(list(index), device=self.hidden.device)
        return EncodedText(
            hidden=self.hidden[rows, :length],
            mask=self.mask[rows, :length],
            token_categories=self.token_categories[rows, :length],
        )


@dataclass
class NetworkOutputs:
    """Raw per-level predictions of the fused network, before any decoding."""

    features: list[Tensor]  # fused image levels (B, C, H, W)
    pre_fusion_features: list[Tensor]  # FPN levels before fusion (B, C, H, W), for L_inter
    text: Tensor  # fused text states (B, T, H)
    logits: list[Tensor]  # region-word logits per level (B, H*W, T)
    bbox_reg: list[Tensor]  # box deltas per level (B, 4, H, W)
    centerness: list[Tensor]  # centerness logits per level (B, 1, H, W)


@META_ARCH_REGISTRY.register()
class GLIPv2(nn.Module):
    """Grounded detector: Swin-FPN + BERT -> VL-DyHead fusion -> ATSS region-word head (+ task heads).

    Inputs, one dict per image: "image" (C, H, W) in INPUT.FORMAT, "prompt" (``Prompt``), optional
    "height"/"width" (the size to return boxes in). Training also reads "instances" with gt_boxes and
    positive_map (boxes x prompt tokens; ``gt_category_uids`` when the prompt names categories, for
    L_inter) and an optional per-image "loss_weight" on the grounding losses; task heads read their
    own ground truth from the dicts (VQAHead: "vqa_targets", the ``(MODEL.VQA.NUM_ANSWERS,)`` soft
    scores of the answers; a VQA image without boxes has "loss_weight" 0, see data/vqa_mapper.py).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        language_backbone: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        fusion: nn.Module,
        head: GroundingPredictionHead,
        anchor_generator: LegacyAnchorGenerator,
        post_processor: ATSSPostProcessor,
        loss: GroundingATSSLoss,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        max_query_len: int,
        pad_to_max_query_len: bool,
        input_format: str = "BGR",
        score_with_fused_text: bool = True,
        inter_image_loss: InterImageContrastiveLoss | None = None,
        mlm_head: MaskedLanguageModelingHead | None = None,
        mlm_probability: float = 0.15,
        mlm_only_positive_phrases: bool = False,
        mlm_loss_weight: float = 1.0,
        task_heads: nn.ModuleDict | None = None,
        caption_mode: bool = False,
        fusion_batch: FusionBatchBudget | None = None,
        compile_fusion: str = "",
    ):
        super().__init__()
        self.backbone = backbone
        self.level_names = [name for name, _ in _levels_by_stride(backbone)]
        self.language_backbone = language_backbone
        self.tokenizer = tokenizer
        self.fusion = fusion
        self.head = head
        self.anchor_generator = anchor_generator
        self.post_processor = post_processor
        self.loss = loss
        self.max_query_len = max_query_len
        self.pad_to_max_query_len = pad_to_max_query_len
        self.input_format = input_format
        self.score_with_fused_text = score_with_fused_text
        self.inter_image_loss = inter_image_loss
        self.mlm_head = mlm_head
        self.mlm_vocab = (
            None if mlm_head is None
            else MaskingVocabulary.from_tokenizer(tokenizer, vocab_size=mlm_head.decoder.out_features)
        )
        self.mlm_probability = mlm_probability
        self.mlm_only_positive_phrases = mlm_only_positive_phrases
        self.mlm_loss_weight = mlm_loss_weight
        self.task_heads = task_heads if task_heads is not None else nn.ModuleDict()
        if caption_mode and "CaptionHead" not in self.task_heads:
            raise ValueError("MODEL.CAPTION_ON is True but MODEL.GLIPV2.TASK_HEADS does not name CaptionHead: add it")
        self.caption_mode = caption_mode
        self.fusion_batch = fusion_batch or FusionBatchBudget()
        # Inference only: training runs the modules eagerly (gradient checkpointing, dropout, hooks).
        self.compiled_fusion = CompiledFusion(self._fuse_and_predict, compile_fusion)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        levels = [shape for _, shape in _levels_by_stride(backbone)]
        language_backbone = build_language_backbone(cfg)
        text_config, text_dim = language_backbone.model.config, language_backbone.hidden_size
        fusion = build_fusion(cfg, levels, text_config)
        fused = fusion.output_shape(levels)
        lang, mlm, inter = cfg.MODEL.LANGUAGE_BACKBONE, cfg.MODEL.MLM, cfg.MODEL.INTER_IMAGE_LOSS
        return {
            "backbone": backbone,
            "language_backbone": language_backbone,
            "tokenizer": build_tokenizer(lang.TOKENIZER),
            "fusion": fusion,
            "head": GroundingPredictionHead(cfg, fused, text_dim),
            "anchor_generator": LegacyAnchorGenerator(cfg, fused),
            "post_processor": ATSSPostProcessor(cfg),
            "loss": GroundingATSSLoss(cfg),
            "inter_image_loss": InterImageContrastiveLoss(cfg, levels, text_dim) if inter.ENABLED else None,
            "mlm_head": _build_mlm_head(cfg, text_config),
            "task_heads": build_task_heads(cfg, fused, text_dim),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "max_query_len": lang.MAX_QUERY_LEN,
            "pad_to_max_query_len": lang.PAD_MAX,
            "input_format": cfg.INPUT.FORMAT,
            "score_with_fused_text": cfg.MODEL.DYHEAD.SCORE_WITH_FUSED_TEXT,
            "mlm_probability": mlm.PROBABILITY,
            "mlm_only_positive_phrases": mlm.ONLY_POSITIVE_PHRASES,
            "mlm_loss_weight": mlm.LOSS_WEIGHT,
            "caption_mode": cfg.MODEL.CAPTION_ON,
            "fusion_batch": FusionBatchBudget(
                memory_mb=cfg.TEST.FUSION_BATCH_MEMORY_MB,
                channels=max(shape.channels for shape in [*levels, *fused]),
                embed_dim=cfg.MODEL.DYHEAD.FUSION.EMBED_DIM,
                num_heads=cfg.MODEL.DYHEAD.FUSION.NUM_HEADS,
            ),
            "compile_fusion": cfg.TEST.COMPILE_FUSION,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def leaves_parameters_unused(self) -> bool:
        """Whether a training step leaves trainable parameters without gradient, so that DDP needs
        find_unused_parameters: scoring with the pre-fusion text and no L_mlm leaves the last
        bi-attention's text branch out of every loss."""
        return not self.score_with_fused_text and self.mlm_head is None

    def preprocess_image(self, batched_inputs: list[dict]) -> ImageList:
        """Normalise and pad to the backbone's size divisibility (32 for Swin-FPN)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def encode_text(
        self, prompts: list[Prompt], batched_inputs: list[dict] | None = None, caption_mode: bool = False
    ) -> EncodedText:
        """Run the text encoder once per distinct caption and gather the rows back per image.

        In training with L_mlm the distinct prompts are corrupted BERT-style before the encoder (the
        whole forward pass then reads them, as officially), never at inference; ``batched_inputs``
        give the grounded tokens when MLM.ONLY_POSITIVE_PHRASES is set. ``caption_mode``: causal
        text, never corrupted.
        """
        distinct: dict[str, int] = {}
        rows = [distinct.setdefault(prompt.caption, len(distinct)) for prompt in prompts]
        first = {row: prompt for prompt, row in zip(reversed(prompts), reversed(rows))}
        unique = [first[row] for row in range(len(distinct))]
        input_ids = self._pad_tokens([p.input_ids for p in unique], self.tokenizer.pad_token_id)
        mask = self._pad_tokens([p.attention_mask for p in unique], 0)
        mlm_labels = None
        if self.training and self.mlm_head is not None and not caption_mode:
            if any(p.text_embedding is not None for p in unique):
                raise ValueError("a tuned prompt (text_embedding) cannot be MLM-corrupted: set MODEL.MLM.ENABLED False")
            eligible = self._grounded_tokens(batched_inputs, rows, input_ids.shape)
            input_ids, mlm_labels = mask_tokens(
                input_ids, mask, self.mlm_vocab, probability=self.mlm_probability, eligible=eligible
            )
        hidden = self._text_states(unique, input_ids, mask, caption_mode)
        index = torch.tensor(rows, device=self.device)
        return EncodedText(
            hidden=hidden[index],
            mask=mask[index],
            token_categories=self._pad_tokens([p.token_categories for p in prompts], NO_CATEGORY),
            mlm_labels=None if mlm_labels is None else mlm_labels[index],
        )

    def _text_states(self, unique: list[Prompt], input_ids: Tensor, mask: Tensor, caption_mode: bool) -> Tensor:
        """(distinct prompts, T, H) encoder output. A prompt carrying its tuned ``text_embedding``
        (prompt tuning) takes it, zero-padded, and the encoder runs only on the others, if any."""
        read = [i for i, p in enumerate(unique) if p.text_embedding is None]
        if len(read) == len(unique):
            return self._run_text_encoder(input_ids, mask, caption_mode)
        encoded = iter(self._run_text_encoder(input_ids[read], mask[read], caption_mode) if read else ())
        length = input_ids.shape[1]
        return torch.stack([
            next(encoded) if p.text_embedding is None
            else F.pad(p.text_embedding.to(self.device), (0, 0, 0, length - len(p)))
            for p in unique
        ])

    def _run_text_encoder(self, input_ids: Tensor, mask: Tensor, caption_mode: bool) -> Tensor:
        if caption_mode:
            return self.language_backbone(input_ids, mask, causal=True)["hidden"]
        return self.language_backbone(input_ids, mask)["hidden"]

    def _pad_tokens(self, rows: list[Tensor], value: int) -> Tensor:
        """Right-pad per-prompt token rows to the batch's longest (or MAX_QUERY_LEN with PAD_MAX)."""
        longest = max(len(row) for row in rows)
        if longest > self.max_query_len:
            raise ValueError(f"a prompt has {longest} tokens, more than MAX_QUERY_LEN={self.max_query_len}")
        padded = pad_sequence([row.to(self.device) for row in rows], batch_first=True, padding_value=value)
        extra = self.max_query_len - longest if self.pad_to_max_query_len else 0
        return F.pad(padded, (0, extra), value=value)

    def _grounded_tokens(self, batched_inputs: list[dict] | None, rows: list[int], shape: torch.Size) -> Tensor | None:
        """(distinct prompts, T) tokens of some GT's phrase, the MLM candidates with ONLY_POSITIVE_PHRASES."""
        if not self.mlm_only_positive_phrases:
            return None
        eligible = torch.zeros(shape, dtype=torch.bool, device=self.device)
        for index, (x, row) in enumerate(zip(batched_inputs, rows)):
            grounded = _instances_of(x, index).positive_map.to(self.device).bool().any(dim=0)
            eligible[row, : grounded.shape[0]] |= grounded
        return eligible

    def extract_features(self, images: ImageList) -> list[Tensor]:
        """The backbone's levels before fusion, finest first: what every prompt of an image shares."""
        pyramid = self.backbone(images.tensor)
        return [pyramid[name] for name in self.level_names]

    def _scored_text(self, fused_text: Tensor, hidden: Tensor, mask: Tensor) -> Tensor:
        """The text the head scores regions against: fused, or (official "embedded") the encoder
        output masked when the head scores before fusion."""
        return fused_text if self.score_with_fused_text else hidden * mask[..., None]

    def _fuse_and_predict(
        self, pre_fusion: list[Tensor], hidden: Tensor, mask: Tensor
    ) -> tuple[list[Tensor], Tensor, dict[str, list[Tensor]]]:
        """Fusion tower and prediction head: the part TEST.COMPILE_FUSION compiles."""
        features, fused_text = self.fusion(pre_fusion, hidden, mask)
        return features, fused_text, self.head(features, self._scored_text(fused_text, hidden, mask))

    def run_network(
        self,
        images: ImageList,
        text: EncodedText,
        caption_mode: bool = False,
        pre_fusion: list[Tensor] | None = None,
    ) -> NetworkOutputs:
        """Backbone (unless its ``pre_fusion`` levels are given), fusion tower and prediction head on
        a preprocessed batch."""
        if pre_fusion is None:
            pre_fusion = self.extract_features(images)
        if caption_mode:
            features, fused_text = self.fusion(pre_fusion, text.hidden, text.mask, caption_mode=True)
            predictions = self.head(features, self._scored_text(fused_text, text.hidden, text.mask))
        else:
            fuse = self._fuse_and_predict if self.training else self.compiled_fusion
            features, fused_text, predictions = fuse(pre_fusion, text.hidden, text.mask)
        return NetworkOutputs(
            features=features,
            pre_fusion_features=pre_fusion,
            text=fused_text,
            logits=predictions["logits"],
            bbox_reg=predictions["bbox_reg"],
            centerness=predictions["centerness"],
        )

    def forward(
        self, batched_inputs: list[dict], caption_mode: bool | None = None
    ) -> list[dict] | dict[str, Tensor]:
        """Training: the loss dict; inference: see ``inference``. Inputs: see the class docstring.
        ``caption_mode``: None follows MODEL.CAPTION_ON; in caption mode an image without
        "instances" (captions without boxes) trains the language model only."""
        caption_mode = self.caption_mode if caption_mode is None else caption_mode
        if not self.training:
            return self.inference(batched_inputs, caption_mode=caption_mode)
        prompts = [_prompt_of(x, i) for i, x in enumerate(batched_inputs)]
        if caption_mode:
            batched_inputs = [_with_caption_instances(x, prompt) for x, prompt in zip(batched_inputs, prompts)]
        instances = [_instances_of(x, i).to(self.device) for i, x in enumerate(batched_inputs)]
        images = self.preprocess_image(batched_inputs)
        text = self.encode_text(prompts, batched_inputs, caption_mode=caption_mode)
        outputs = self.run_network(images, text, caption_mode=caption_mode)
        num_tokens = text.mask.shape[1]
        positive_maps = [_pad_columns(x.positive_map.float(), num_tokens) for x in instances]
        anchors = self.anchor_generator(outputs.features)
        targets = self.loss.prepare_targets(anchors, [x.gt_boxes.tensor for x in instances], positive_maps, num_tokens)
        losses = self.loss.losses(
            targets, anchors, outputs.logits, outputs.bbox_reg, outputs.centerness, text.mask,
            _image_weights(batched_inputs, self.device),
        )
        if self.inter_image_loss is not None and not caption_mode:
            losses["loss_inter_image"] = self.inter_image_loss(
                outputs.pre_fusion_features,
                text.hidden if self.inter_image_loss.text_features == "pre_fusion" else outputs.text,
                text.mask,
                _region_word_labels(instances, text.token_categories, targets.matched_idxs, positive_maps),
            )
        if self.mlm_head is not None and not caption_mode:
            losses["loss_mlm"] = self.mlm_head(outputs.text, text.mlm_labels) * self.mlm_loss_weight
        head_inputs = _task_head_inputs(
            images, batched_inputs, prompts, text, outputs, anchors, caption_mode=caption_mode
        )
        for name, task_head in self.task_heads.items():
            head_losses = task_head(head_inputs)
            clash = sorted(set(head_losses) & set(losses))
            if clash:
                raise ValueError(f"task head {name!r} returns loss terms {clash} that another part already returns")
            losses.update(head_losses)
        _check_finite(losses)
        return losses

    def inference(
        self,
        batched_inputs: list[dict],
        do_postprocess: bool = True,
        finish: bool = True,
        caption_mode: bool | None = None,
    ) -> list[dict]:
        """Detections per image: Instances(pred_boxes, scores, pred_classes) in input-image pixels
        ("height"/"width" when given, as Detectron2 models do; network-input pixels without
        ``do_postprocess``), plus the task heads' outputs. ``pred_classes`` are the labels of each
        image's prompt. ``finish=False`` leaves output-size fields (pasted masks) to a later
        ``finish_instances``: chunked prompts merge and cut their detections first.
        In caption mode (``caption_mode``, None: MODEL.CAPTION_ON) the inputs need no prompt and the
        outputs are ``generate_captions``'s with the config's decoding options."""
        if self.caption_mode if caption_mode is None else caption_mode:
            return self.generate_captions(batched_inputs)
        prompts = [_prompt_of(x, i) for i, x in enumerate(batched_inputs)]
        images = self.preprocess_image(batched_inputs)
        text = self.encode_text(prompts)
        outputs = self.run_network(images, text)
        return self.postprocess(images, batched_inputs, prompts, text, outputs, rescale=do_postprocess, finish=finish)

    def inference_over_prompts(self, batched_inputs: list[dict], prompts: Sequence[Prompt]) -> list[list[Instances]]:
        """Every image read with each of ``prompts`` (e.g. a long vocabulary's chunks): see
        ``inference_over_prompt_lists``."""
        return self.inference_over_prompt_lists(batched_inputs, [prompts] * len(batched_inputs))

    def inference_over_prompt_lists(
        self, batched_inputs: list[dict], prompt_lists: Sequence[Sequence[Prompt]]
    ) -> list[list[Instances]]:
        """Each image read with each prompt of its own list: per image, one unfinished ``Instances``
        per prompt in list order, as ``inference(..., finish=False)`` gives them.

        Only the fusion tower and the head read the text, so the backbone runs once per image and the
        text encoder once for the distinct prompts; the (image, prompt) pairs then run through fusion,
        head and post-processing in groups within TEST.FUSION_BATCH_MEMORY_MB (``FusionBatchBudget``),
        each group padded to its longest prompt. Padding changes no output at real tokens (see
        ``VLDyHeadTower``) and no label score (a label averages its own tokens only)."""
        if len(prompt_lists) != len(batched_inputs):
            raise ValueError(f"{len(batched_inputs)} images but {len(prompt_lists)} prompt lists")
        empty = [i for i, prompts in enumerate(prompt_lists) if not prompts]
        if empty:
            raise ValueError(f"images {empty} have no prompt")
        distinct = list({id(p): p for prompts in prompt_lists for p in prompts}.values())
        row_of = {id(p): row for row, p in enumerate(distinct)}
        pairs = [
            PromptPair(i, k, row_of[id(p)]) for i, prompts in enumerate(prompt_lists) for k, p in enumerate(prompts)
        ]
        images = self.preprocess_image(batched_inputs)
        pre_fusion = self.extract_features(images)
        text = self.encode_text(distinct)
        lengths = [text.mask.shape[1] if self.pad_to_max_query_len else len(p) for p in distinct]
        positions = sum(level.shape[-2] * level.shape[-1] for level in pre_fusion)
        per_image: list[list[Instances]] = [[None] * len(prompts) for prompts in prompt_lists]
        for group in self.fusion_batch.groups(pairs, lengths, positions):
            group_text = text.rows([pair.row for pair in group], max(lengths[pair.row] for pair in group))
            results = self._infer_pairs(images, pre_fusion, batched_inputs, distinct, group_text, group)
            for pair, instances in zip(group, results, strict=True):
                per_image[pair.image][pair.prompt] = instances
        return per_image

    def _infer_pairs(
        self,
        images: ImageList,
        pre_fusion: list[Tensor],
        batched_inputs: list[dict],
        prompts: list[Prompt],
        text: EncodedText,
        pairs: list[PromptPair],
    ) -> list[Instances]:
        """Unfinished detections of one group of pairs run as one batch: each pair's image rows
        repeated from the batch's backbone levels (no backbone rerun), ``text`` already in pair order."""
        index = torch.tensor([pair.image for pair in pairs], device=self.device)
        group_images = ImageList(images.tensor.index_select(0, index), [images.image_sizes[p.image] for p in pairs])
        features = [level.index_select(0, index) for level in pre_fusion]
        group_prompts = [prompts[pair.row] for pair in pairs]
        inputs = [{**batched_inputs[pair.image], "prompt": prompt} for pair, prompt in zip(pairs, group_prompts)]
        outputs = self.run_network(group_images, text, pre_fusion=features)
        results = self.postprocess(group_images, inputs, group_prompts, text, outputs, finish=False)
        return [result["instances"] for result in results]

    def generate_captions(
        self,
        batched_inputs: list[dict],
        options: CaptionDecodingOptions | None = None,
        use_cache: bool | None = None,
    ) -> list[dict]:
        """Caption each input image ("image", optional "height"/"width"; no prompt) in caption mode:
        see ``glipv2_d2.modeling.caption.generate``. ``options`` default to MODEL.CAPTION's,
        ``use_cache`` to MODEL.CAPTION.USE_CACHE (False recomputes the whole model at every step)."""
        if "CaptionHead" not in self.task_heads:
            raise ValueError("captioning needs a CaptionHead: add it to MODEL.GLIPV2.TASK_HEADS")
        head = self.task_heads["CaptionHead"]
        return generate_captions(
            self, batched_inputs, options or head.options, head.use_cache if use_cache is None else use_cache
        )

    def finish_instances(self, instances: Instances) -> Instances:
        """Each task head's ``finish_instances`` on one image's final detections."""
        for task_head in self.task_heads.values():
            instances = task_head.finish_instances(instances)
        return instances

    def postprocess(
        self,
        images: ImageList,
        batched_inputs: list[dict],
        prompts: list[Prompt],
        text: EncodedText,
        outputs: NetworkOutputs,
        rescale: bool = True,
        finish: bool = True,
    ) -> list[dict]:
        """Network outputs -> output dicts: ATSS decoding, NMS, the task heads, rescaling, then (with
        ``finish``) each head's ``finish_instances`` (masks pasted at the output size)."""
        anchors = self.anchor_generator(outputs.features)
        detections = self.post_processor(
            outputs.bbox_reg, outputs.centerness, outputs.logits, anchors, images.image_sizes,
            [prompt.label_to_tokens for prompt in prompts],
        )
        results = [{"instances": instances} for instances in detections]
        if len(self.task_heads):
            head_inputs = _task_head_inputs(images, batched_inputs, prompts, text, outputs, anchors, detections)
            for task_head in self.task_heads.values():
                for result, extra in zip(results, task_head(head_inputs), strict=True):
                    result.update(extra)
        for result, x, size in zip(results, batched_inputs, images.image_sizes):
            if rescale:
                height, width = x.get("height", size[0]), x.get("width", size[1])
                result["instances"] = rescale_instances(result["instances"], height, width)
            if finish:
                result["instances"] = self.finish_instances(result["instances"])
        return results


def _levels_by_stride(backbone: Backbone) -> list[tuple[str, ShapeSpec]]:
    """The backbone's output levels, finest first: the order of anchors, heads and checkpoints."""
    return sorted(backbone.output_shape().items(), key=lambda item: item[1].stride)


def _task_head_inputs(
    images: ImageList,
    batched_inputs: list[dict],
    prompts: list[Prompt],
    text: EncodedText,
    outputs: NetworkOutputs,
    anchors: list[Tensor],
    detections: list[Instances] | None = None,
    caption_mode: bool = False,
) -> TaskHeadInputs:
    return TaskHeadInputs(
        images=images,
        batched_inputs=batched_inputs,
        prompts=prompts,
        pre_fusion_features=outputs.pre_fusion_features,
        features=outputs.features,
        text=outputs.text,
        text_mask=text.mask,
        anchors=anchors,
        logits=outputs.logits,
        bbox_reg=outputs.bbox_reg,
        centerness=outputs.centerness,
        detections=detections,
        caption_mode=caption_mode,
    )


def _with_caption_instances(x: dict, prompt: Prompt) -> dict:
    """A caption-mode input that has no boxes gets empty instances and a zero grounding-loss weight."""
    if "instances" in x:
        return x
    height, width = x["image"].shape[-2:]
    empty = Instances((height, width))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    empty.positive_map = torch.zeros(0, len(prompt), dtype=torch.bool)
    return {**x, "instances": empty, "loss_weight": 0.0}


def _image_weights(batched_inputs: list[dict], device: torch.device) -> Tensor | None:
    """Per-image factors of the grounding losses ("loss_weight", e.g. pseudo-boxed captions), None if all 1."""
    weights = [float(x.get("loss_weight", 1.0)) for x in batched_inputs]
    return None if all(w == 1.0 for w in weights) else torch.tensor(weights, device=device)


def _region_word_labels(
    instances: list[Instances], token_categories: Tensor, matched_idxs: Tensor, positive_maps: list[Tensor]
) -> RegionWordLabels:
    """L_inter's label propagation: each box's category uid (``gt_category_uids``; -1 without) and each
    token's; free-form captions carry no token category, so nothing propagates to them."""
    gt_categories = [
        x.gt_category_uids.long() if x.has("gt_category_uids")
        else torch.full((len(x),), NO_CATEGORY, dtype=torch.long, device=token_categories.device)
        for x in instances
    ]
    return RegionWordLabels(
        matched_idxs=matched_idxs,
        positive_maps=positive_maps,
        gt_categories=gt_categories,
        token_categories=token_categories,
        is_detection=(token_categories != NO_CATEGORY).any(dim=1),
    )


def _build_mlm_head(cfg: CfgNode, text_config) -> MaskedLanguageModelingHead | None:
    """The MLM head, started from the text model's own LM head when it ships one."""
    if not cfg.MODEL.MLM.ENABLED:
        return None
    head = MaskedLanguageModelingHead.from_text_config(text_config)
    lang = cfg.MODEL.LANGUAGE_BACKBONE
    if lang.LOAD_PRETRAINED and cfg.MODEL.MLM.INIT_FROM_TEXT_MODEL:
        load_pretrained_mlm_head(head, resolve_text_model_path(lang.MODEL_PATH))
    return head


def rescale_instances(instances: Instances, height: int, width: int) -> Instances:
    """Scale boxes from the network input size to the original (height, width).

    Unlike detectron2's detector_postprocess this keeps zero-width boxes, as the official
    BoxList.resize does, so detections stay identical to GLIP's.
    """
    in_h, in_w = instances.image_size
    result = Instances((height, width), **instances.get_fields())
    result.pred_boxes = Boxes(instances.pred_boxes.tensor.clone())  # the caller's boxes stay as they are
    result.pred_boxes.scale(width / in_w, height / in_h)
    return result


def _pad_columns(positive_map: Tensor, num_tokens: int) -> Tensor:
    """Widen a (boxes, tokens-of-this-caption) map to the batch's token count with zeros."""
    if positive_map.shape[1] > num_tokens:
        raise ValueError(f"positive_map has {positive_map.shape[1]} token columns, the batch only {num_tokens}")
    return F.pad(positive_map, (0, num_tokens - positive_map.shape[1]))


def _check_finite(losses: dict[str, Tensor]) -> None:
    """Stop at the first NaN/Inf loss, naming the term and the iteration, instead of training on."""
    bad = [name for name, value in losses.items() if not torch.isfinite(value).all()]
    if bad:
        where = f" at iteration {get_event_storage().iter}" if has_event_storage() else ""
        values = {name: float(losses[name]) for name in bad}
        raise FloatingPointError(f"loss term(s) {values} became NaN/Inf{where}; training stopped")


def _prompt_of(x: dict, index: int) -> Prompt:
    prompt = x.get("prompt")
    if not isinstance(prompt, Prompt):
        raise ValueError(
            f"input {index} has no 'prompt' (a glipv2_d2.structures.Prompt, got {type(prompt).__name__}); "
            "build it with glipv2_d2.data.prompt_builder.PromptBuilder"
        )
    return prompt


def _instances_of(x: dict, index: int) -> Instances:
    if "instances" not in x:
        raise ValueError(f"training input {index} ({x.get('file_name', 'no file name')}) has no 'instances'")
    return x["instances"]
