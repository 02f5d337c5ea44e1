"""The GLIPv2 meta-architecture: encoders, deep fusion, region-word head, post-processing.

Every input dict carries its own text, so one batch can mix prompts; the text encoder runs once per
DISTINCT prompt of the batch, and prompts are padded to the batch's longest one unless
MODEL.LANGUAGE_BACKBONE.PAD_MAX asks for the official fixed length.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage, has_event_storage
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from .anchor_generator import LegacyAnchorGenerator
from .box_coder import LegacyBoxCoder
from .dense_head import GroundingPredictionHead
from .fusion import VLDyHeadTower
from .inter_image_loss import InterImageContrastiveLoss, RegionWordLabels, token_category_ids
from .language import build_language_backbone, build_tokenizer
from .language.build import resolve_text_model_path
from .losses import GroundingATSSLoss
from .mlm import MaskedLanguageModelingHead, MaskingVocabulary, load_pretrained_mlm_head, mask_tokens
from .postprocessing import ATSSPostProcessor


@dataclass
class EncodedText:
    """Text of a batch after the text encoder, one row per image (rows of a shared prompt alias)."""

    hidden: Tensor  # (B, T, H) last-layer states fed to the fusion tower
    mask: Tensor  # (B, T) 1 on real tokens
    mlm_labels: Tensor | None = None  # (B, T) original ids of MLM-corrupted tokens, -100 elsewhere


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
    """Grounded detector: Swin-FPN + BERT -> VL-DyHead fusion -> ATSS region-word head."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        language_backbone: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        fusion: VLDyHeadTower,
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
        inter_image_text: str = "pre_fusion",
        mlm_head: MaskedLanguageModelingHead | None = None,
        mlm_probability: float = 0.15,
        mlm_only_positive_phrases: bool = False,
        mlm_loss_weight: float = 1.0,
        weak_sample_loss_weight: float = 1.0,
    ):
        super().__init__()
        self.backbone = backbone
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
        if inter_image_text not in ("pre_fusion", "fused"):
            raise ValueError(
                f"MODEL.INTER_IMAGE_LOSS.TEXT_FEATURES must be 'pre_fusion' or 'fused', got {inter_image_text!r}"
            )
        self.inter_image_loss = inter_image_loss
        self.inter_image_text = inter_image_text
        self.mlm_head = mlm_head
        self.mlm_vocab = (
            None if mlm_head is None
            else MaskingVocabulary.from_tokenizer(tokenizer, vocab_size=mlm_head.decoder.out_features)
        )
        self.mlm_probability = mlm_probability
        self.mlm_only_positive_phrases = mlm_only_positive_phrases
        self.mlm_loss_weight = mlm_loss_weight
        self.weak_sample_loss_weight = weak_sample_loss_weight
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        language_backbone = build_language_backbone(cfg)
        dyhead, atss = cfg.MODEL.DYHEAD, cfg.MODEL.ATSS
        fusion = VLDyHeadTower(
            num_layers=dyhead.NUM_LAYERS,
            channels=dyhead.CHANNELS,
            in_channels=cfg.MODEL.FPN.OUT_CHANNELS,
            lang_config=language_backbone.model.config,
            embed_dim=dyhead.FUSION.EMBED_DIM,
            num_heads=dyhead.FUSION.NUM_HEADS,
            fusion_dropout=dyhead.FUSION.DROPOUT,
            drop_path=dyhead.FUSION.DROP_PATH,
            init_values=dyhead.FUSION.LAYER_SCALE_INIT or None,  # 0: the tower's 1 / num_layers
            use_gn=dyhead.USE_GN,
            use_dyrelu=dyhead.USE_DYRELU,
            use_deform=dyhead.USE_DEFORM,
            use_checkpoint=dyhead.USE_CHECKPOINT,
            last_text_layer=dyhead.SCORE_WITH_FUSED_TEXT,
        )
        head = GroundingPredictionHead(
            in_channels=dyhead.CHANNELS,
            lang_dim=language_backbone.hidden_size,
            num_levels=len(atss.ANCHOR_STRIDES),
            prior_prob=dyhead.PRIOR_PROB,
            log_scale_init=dyhead.LOG_SCALE_INIT,
        )
        box_coder = LegacyBoxCoder(weights=tuple(atss.BBOX_REG_WEIGHTS), scale_clamp=atss.BBOX_XFORM_CLIP)
        return {
            "backbone": backbone,
            "language_backbone": language_backbone,
            "tokenizer": build_tokenizer(cfg.MODEL.LANGUAGE_BACKBONE.TOKENIZER),
            "fusion": fusion,
            "head": head,
            "anchor_generator": LegacyAnchorGenerator(
                sizes=atss.ANCHOR_SIZES,
                strides=atss.ANCHOR_STRIDES,
                aspect_ratios=atss.ASPECT_RATIOS,
                scales_per_octave=atss.SCALES_PER_OCTAVE,
            ),
            "post_processor": ATSSPostProcessor(
                box_coder=box_coder,
                score_thresh=atss.INFERENCE_TH,
                pre_nms_top_n=atss.PRE_NMS_TOP_N,
                nms_thresh=atss.NMS_TH,
                detections_per_img=atss.DETECTIONS_PER_IMG,
            ),
            "loss": GroundingATSSLoss(
                box_coder=box_coder,
                topk=atss.TOPK,
                reg_loss_weight=atss.REG_LOSS_WEIGHT,
                token_loss_weight=atss.TOKEN_LOSS_WEIGHT,
                centerness_loss_weight=atss.CENTERNESS_LOSS_WEIGHT,
                focal_alpha=atss.FOCAL_ALPHA,
                focal_gamma=atss.FOCAL_GAMMA,
                max_query_len=cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN,
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "max_query_len": cfg.MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN,
            "pad_to_max_query_len": cfg.MODEL.LANGUAGE_BACKBONE.PAD_MAX,
            "input_format": cfg.INPUT.FORMAT,
            "score_with_fused_text": dyhead.SCORE_WITH_FUSED_TEXT,
            "inter_image_loss": _build_inter_image_loss(cfg, language_backbone.hidden_size),
            "inter_image_text": cfg.MODEL.INTER_IMAGE_LOSS.TEXT_FEATURES,
            "mlm_head": _build_mlm_head(cfg, language_backbone.model.config),
            "mlm_probability": cfg.MODEL.MLM.PROBABILITY,
            "mlm_only_positive_phrases": cfg.MODEL.MLM.ONLY_POSITIVE_PHRASES,
            "mlm_loss_weight": cfg.MODEL.MLM.LOSS_WEIGHT,
            "weak_sample_loss_weight": cfg.MODEL.WEAK_SAMPLE_LOSS_WEIGHT,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: list[dict]) -> ImageList:
        """Normalise and pad to the backbone's size divisibility (32 for Swin-FPN)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    def tokenize(self, captions: list[str]):
        """Tokenize with the model's tokenizer and padding policy."""
        return self.tokenizer(
            captions,
            max_length=self.max_query_len,
            padding="max_length" if self.pad_to_max_query_len else "longest",
            truncation=True,
            return_tensors="pt",
        )

    def encode_text(self, batched_inputs: list[dict]) -> EncodedText:
        """Run the text encoder once per distinct caption and gather the rows back per image.

        Captions a data mapper already tokenized ("input_ids") are padded here, not re-tokenized.
        In training with L_mlm the distinct prompts are corrupted BERT-style before the encoder (the
        whole forward pass then reads them, as officially); never at inference.
        """
        captions = [_caption_of(x, i) for i, x in enumerate(batched_inputs)]
        distinct = list(dict.fromkeys(captions))
        first = [batched_inputs[captions.index(c)] for c in distinct]
        if all("input_ids" in x for x in first):
            input_ids, mask = self._pad_token_ids([x["input_ids"] for x in first])
        else:
            tokens = self.tokenize(distinct)
            input_ids = tokens["input_ids"].to(self.device)
            mask = tokens["attention_mask"].to(self.device)
        mlm_labels = None
        if self.training and self.mlm_head is not None:
            eligible = self._grounded_tokens(batched_inputs, captions, distinct, input_ids.shape)
            input_ids, mlm_labels = mask_tokens(
                input_ids, mask, self.mlm_vocab, probability=self.mlm_probability, eligible=eligible
            )
        encoded = self.language_backbone(input_ids, mask)
        rows = torch.tensor([distinct.index(c) for c in captions], device=self.device)
        return EncodedText(encoded["hidden"][rows], mask[rows], None if mlm_labels is None else mlm_labels[rows])

    def _grounded_tokens(
        self, batched_inputs: list[dict], captions: list[str], distinct: list[str], shape: torch.Size
    ) -> Tensor | None:
        """(distinct prompts, T) tokens of some GT's phrase, the MLM candidates with ONLY_POSITIVE_PHRASES."""
        if not self.mlm_only_positive_phrases:
            return None
        eligible = torch.zeros(shape, dtype=torch.bool, device=self.device)
        for x, caption in zip(batched_inputs, captions):
            grounded = x["instances"].positive_map.to(self.device).bool().any(dim=0)
            eligible[distinct.index(caption), : grounded.shape[0]] |= grounded
        return eligible

    def _pad_token_ids(self, sequences: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Right-pad 1-D token id tensors to the batch's longest (or MAX_QUERY_LEN with PAD_MAX)."""
        longest = max(len(ids) for ids in sequences)
        if longest > self.max_query_len:
            raise ValueError(f"a tokenized caption has {longest} tokens, more than MAX_QUERY_LEN={self.max_query_len}")
        extra = self.max_query_len - longest if self.pad_to_max_query_len else 0
        input_ids = F.pad(pad_sequence(sequences, batch_first=True, padding_value=self.tokenizer.pad_token_id),
                          (0, extra), value=self.tokenizer.pad_token_id)
        mask = F.pad(pad_sequence([torch.ones_like(ids) for ids in sequences], batch_first=True), (0, extra))
        return input_ids.to(self.device), mask.to(self.device)

    def run_network(self, images: ImageList, text: EncodedText) -> NetworkOutputs:
        """Backbone, fusion tower and prediction head on a preprocessed batch."""
        pyramid = self.backbone(images.tensor)
        pre_fusion = [pyramid[name] for name in self.backbone.output_shape()]
        features, fused_text = self.fusion(pre_fusion, text.hidden, text.mask)
        # Official "embedded" text when the head scores before fusion: the encoder output, masked.
        scored_text = fused_text if self.score_with_fused_text else text.hidden * text.mask[..., None]
        predictions = self.head(features, scored_text)
        return NetworkOutputs(
            features=features,
            pre_fusion_features=pre_fusion,
            text=fused_text,
            logits=predictions["logits"],
            bbox_reg=predictions["bbox_reg"],
            centerness=predictions["centerness"],
        )

    def forward(self, batched_inputs: list[dict]) -> list[dict] | dict[str, Tensor]:
        """Training: the loss dict (inputs need "instances" with gt_boxes and positive_map; L_inter
        also reads "task", "label_to_tokens" and "label_uids", the weak-data weight "weak").
        Inference: see `inference`."""
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        text = self.encode_text(batched_inputs)
        outputs = self.run_network(images, text)
        num_tokens = text.mask.shape[1]
        gt_boxes, positive_maps = [], []
        for i, x in enumerate(batched_inputs):
            if "instances" not in x:
                raise ValueError(f"training input {i} ({x.get('file_name', 'no file name')}) has no 'instances'")
            instances = x["instances"].to(self.device)
            gt_boxes.append(instances.gt_boxes.tensor)
            positive_maps.append(_pad_columns(instances.positive_map.float(), num_tokens))
        anchors = self.anchor_generator(outputs.features)
        targets = self.loss.prepare_targets(anchors, gt_boxes, positive_maps, num_tokens)
        losses = self.loss.losses(
            targets, anchors, outputs.logits, outputs.bbox_reg, outputs.centerness, text.mask,
            self._image_weights(batched_inputs),
        )
        if self.inter_image_loss is not None:
            losses["loss_inter_image"] = self.inter_image_loss(
                outputs.pre_fusion_features,
                text.hidden if self.inter_image_text == "pre_fusion" else outputs.text,
                text.mask,
                self._region_word_labels(batched_inputs, targets.matched_idxs, positive_maps, num_tokens),
            )
        if self.mlm_head is not None:
            losses["loss_mlm"] = self.mlm_head(outputs.text, text.mlm_labels) * self.mlm_loss_weight
        _check_finite(losses)
        return losses

    def _image_weights(self, batched_inputs: list[dict]) -> Tensor | None:
        """Per-image loss factors: WEAK_SAMPLE_LOSS_WEIGHT for pseudo-boxed samples, else None (all 1)."""
        if not any(x.get("weak", False) for x in batched_inputs):
            return None
        return torch.tensor(
            [self.weak_sample_loss_weight if x.get("weak", False) else 1.0 for x in batched_inputs], device=self.device
        )

    def _region_word_labels(
        self, batched_inputs: list[dict], matched_idxs: Tensor, positive_maps: list[Tensor], num_tokens: int
    ) -> RegionWordLabels:
        """Categories for L_inter's label propagation, as name uids shared by every dataset ("label_uids"
        from the detection mapper; contiguous ids without it). Grounding-type samples carry none."""
        gt_categories, token_maps, is_detection = [], [], []
        for x in batched_inputs:
            detection = x.get("task", "detection") == "detection"
            uids = x.get("label_uids") or {}
            classes = x["instances"].gt_classes.tolist() if detection else [-1] * len(x["instances"])
            gt_categories.append(torch.tensor([uids.get(c, c) for c in classes], dtype=torch.long, device=self.device))
            label_map = x.get("label_to_tokens", {}) if detection else {}
            token_maps.append({uids.get(label, label): tokens for label, tokens in label_map.items()})
            is_detection.append(detection)
        return RegionWordLabels(
            matched_idxs=matched_idxs,
            positive_maps=positive_maps,
            gt_categories=gt_categories,
            token_categories=token_category_ids(token_maps, num_tokens, self.device),
            is_detection=torch.tensor(is_detection, device=self.device),
        )

    def inference(self, batched_inputs: list[dict], do_postprocess: bool = True) -> list[dict]:
        """Detections per image: Instances(pred_boxes, scores, pred_classes) in input-image pixels.

        Each input needs "image", "caption" and "label_to_tokens" ({label id: [token indices]});
        "height"/"width" (original size) rescale the boxes, as Detectron2 models do.
        """
        label_maps = [_label_map_of(x, i) for i, x in enumerate(batched_inputs)]
        images = self.preprocess_image(batched_inputs)
        text = self.encode_text(batched_inputs)
        outputs = self.run_network(images, text)
        anchors = self.anchor_generator(outputs.features)
        results = self.post_processor(
            outputs.bbox_reg, outputs.centerness, outputs.logits, anchors, images.image_sizes, label_maps
        )
        if not do_postprocess:
            return [{"instances": r} for r in results]
        processed = []
        for result, x, size in zip(results, batched_inputs, images.image_sizes):
            height, width = x.get("height", size[0]), x.get("width", size[1])
            processed.append({"instances": rescale_instances(result, height, width)})
        return processed


def _build_inter_image_loss(cfg: CfgNode, text_dim: int) -> InterImageContrastiveLoss | None:
    settings = cfg.MODEL.INTER_IMAGE_LOSS
    if not settings.ENABLED:
        return None
    return InterImageContrastiveLoss(
        image_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        text_dim=text_dim,
        dim=settings.DIM,
        max_regions=settings.MAX_REGIONS,
        log_scale_init=settings.LOG_SCALE_INIT,
        loss_weight=settings.WEIGHT,
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


def _caption_of(x: dict, index: int) -> str:
    caption = x.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"input {index} has no text: 'caption' must be a non-empty string, got {caption!r}")
    return caption


def _label_map_of(x: dict, index: int) -> dict[int, list[int]]:
    label_map = x.get("label_to_tokens")
    if not label_map:
        raise ValueError(
            f"input {index} has no 'label_to_tokens' map (label id -> token indices); build it with "
            f"glipv2_d2.data.prompts for the caption {x.get('caption')!r}"
        )
    return label_map
