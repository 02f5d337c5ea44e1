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
from .language import build_language_backbone, build_tokenizer
from .losses import GroundingATSSLoss
from .postprocessing import ATSSPostProcessor


@dataclass
class EncodedText:
    """Text of a batch after the text encoder, one row per image (rows of a shared prompt alias)."""

    hidden: Tensor  # (B, T, H) last-layer states fed to the fusion tower
    mask: Tensor  # (B, T) 1 on real tokens


@dataclass
class NetworkOutputs:
    """Raw per-level predictions of the fused network, before any decoding."""

    features: list[Tensor]  # fused image levels (B, C, H, W)
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
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        language_backbone = build_language_backbone(cfg)
        dyhead, atss = cfg.MODEL.DYHEAD, cfg.MODEL.ATSS
        layer_scale = dyhead.FUSION.LAYER_SCALE_INIT or 1.0 / dyhead.NUM_LAYERS
        fusion = VLDyHeadTower(
            num_layers=dyhead.NUM_LAYERS,
            channels=dyhead.CHANNELS,
            in_channels=cfg.MODEL.FPN.OUT_CHANNELS,
            lang_config=language_backbone.model.config,
            embed_dim=dyhead.FUSION.EMBED_DIM,
            num_heads=dyhead.FUSION.NUM_HEADS,
            fusion_dropout=dyhead.FUSION.DROPOUT,
            drop_path=dyhead.FUSION.DROP_PATH,
            init_values=layer_scale,
            use_gn=dyhead.USE_GN,
            use_dyrelu=dyhead.USE_DYRELU,
            use_deform=dyhead.USE_DEFORM,
            use_checkpoint=dyhead.USE_CHECKPOINT,
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
        encoded = self.language_backbone(input_ids, mask)
        rows = torch.tensor([distinct.index(c) for c in captions], device=self.device)
        return EncodedText(encoded["hidden"][rows], mask[rows])

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
        features = [pyramid[name] for name in self.backbone.output_shape()]
        features, fused_text = self.fusion(features, text.hidden, text.mask)
        predictions = self.head(features, fused_text)
        return NetworkOutputs(
            features=features,
            text=fused_text,
            logits=predictions["logits"],
            bbox_reg=predictions["bbox_reg"],
            centerness=predictions["centerness"],
        )

    def forward(self, batched_inputs: list[dict]) -> list[dict] | dict[str, Tensor]:
        """Training: the loss dict (inputs need "instances" with gt_boxes and positive_map).
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
        losses = self.loss(
            self.anchor_generator(outputs.features), gt_boxes, positive_maps,
            outputs.logits, outputs.bbox_reg, outputs.centerness, text.mask,
        )
        _check_finite(losses)
        return losses

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
