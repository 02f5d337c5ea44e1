"""The stacked VL-DyHead fusion tower (EncVL): [bi-attention] -> [BERT layer] -> [DyConv], N times.

Mirrors ``VLDyHead.dyhead_tower`` of microsoft/GLIP (``modeling/rpn/vldyhead.py``) for the
MHA-B fusion with a BERT text encoder. The official tower is a flat ``nn.Sequential`` whose
entries ``3i``, ``3i+1``, ``3i+2`` are ``VLFuse`` (holding ``b_attn``), ``BertEncoderLayer`` and
``DyConv``; here they are ``layers[i].b_attn``, ``layers[i].text_layer`` and ``layers[i].dyconv``
with identical parameter names below those prefixes.

Caption mode (``caption_mode=True``, paper appendix D.2) runs the same weights with the image
blind to the text in every layer and the text causal: ``encode_image`` computes the image side
(every layer's visual path and DyConv) from the image alone, ``decode_text`` the text side over it,
with the BERT layers' keys and values cached between decoding steps when given a cache.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn
from transformers import BertConfig, Cache
from transformers.models.bert.modeling_bert import BertLayer

from ..language.causal import causal_attention_mask
from .bi_attention import BiAttentionBlock, ImageKeys
from .build import FUSION_REGISTRY
from .dyconv import DyConv

__all__ = ["CaptionImageSide", "VLDyHeadLayer", "VLDyHeadTower", "text_attention_mask"]


def text_attention_mask(lang_mask: Tensor, dtype: torch.dtype, attn_implementation: str) -> Tensor:
    """Build the (B, 1, 1, T) key mask ``BertLayer`` expects from a (B, T) 0/1 mask.

    ``sdpa`` takes a boolean mask (True = attend); ``eager`` adds a float mask, with the dtype's
    most negative value on padding as ``get_extended_attention_mask`` does in official GLIP.
    """
    keep = (lang_mask != 0)[:, None, None, :]
    if attn_implementation == "sdpa":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
        ~keep, torch.finfo(dtype).min
    )


@dataclass
class CaptionImageSide:
    """The tower's image side in caption mode: the fused levels and each layer's ``ImageKeys``."""

    features: list[Tensor]
    keys: list[ImageKeys]

    def index_select(self, index: Tensor) -> CaptionImageSide:
        """The rows ``index`` of the batch (an image repeated for its beams)."""
        return CaptionImageSide([f.index_select(0, index) for f in self.features],
                                [k.index_select(index) for k in self.keys])


def _bert_layer_output(out: Tensor | tuple) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


class VLDyHeadLayer(nn.Module):
    """One fusion step: bidirectional attention, a BERT layer on the text, DyConv on the image."""

    def __init__(self, b_attn: BiAttentionBlock, text_layer: nn.Module | None, dyconv: DyConv):
        super().__init__()
        self.b_attn = b_attn
        self.text_layer = text_layer
        self.dyconv = dyconv

    def forward(
        self, features: list[Tensor], lang_hidden: Tensor, lang_mask: Tensor, text_mask: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        features, lang_hidden = self.b_attn(features, lang_hidden, lang_mask)
        if self.text_layer is not None:
            lang_hidden = _bert_layer_output(self.text_layer(lang_hidden, text_mask))
        return self.dyconv(features), lang_hidden

    def image_side(self, features: list[Tensor]) -> tuple[list[Tensor], ImageKeys]:
        """Caption mode: the visual path (no text read) and the keys the text branch reads."""
        features, keys = self.b_attn.image_side(features)
        return self.dyconv(features), keys

    def text_side(
        self, lang_hidden: Tensor, keys: ImageKeys, causal_mask: Tensor, cache: Cache | None = None
    ) -> Tensor:
        """Caption mode: the text branch over ``keys``, then the BERT layer under ``causal_mask``."""
        lang_hidden = self.b_attn.text_side(lang_hidden, keys)
        if self.text_layer is not None:
            lang_hidden = _bert_layer_output(self.text_layer(lang_hidden, causal_mask, cache=cache))
        return lang_hidden


@FUSION_REGISTRY.register()
class VLDyHeadTower(nn.Module):
    """EncVL of GLIP-T / GLIPv2-T: ``num_layers`` fusion steps over P3..P7 and the text tokens.

    Text input: official ``VLDyHead.forward`` feeds the tower ``language_dict_features["hidden"]``,
    the text encoder's LAST layer output (unmasked, not the mean over the last N layers), never the
    masked ``"embedded"``. With N=1 (GLIP-T) they differ only on padding tokens, which cannot reach a
    real token or the image (masked as keys in BERT and in the image-side softmax), so outputs at real
    positions do not depend on them; pass ``hidden`` to match official values exactly everywhere.

    Text layer: transformers' ``BertLayer`` (names ``attention.self.query`` ... ``output.LayerNorm``
    equal the official ``BertEncoderLayer``). The official layer additionally clamps attention
    scores, the FFN activations and the LayerNorm outputs to +-50000; these are fp16 overflow guards
    that cannot bind for finite fp32 activations of a trained model (LayerNorm outputs are bounded
    by sqrt(hidden) * |gamma| + |beta|), and masked scores give a zero softmax weight either way.
    The layer runs with SDPA (unless ``lang_config`` asks for ``eager``).

    Fusion hyper-parameters follow the official ``VLFuse``: 8 heads, attention width 2048,
    dropout 0.1, layer scale initialised to ``1 / num_layers``; text width = ``lang_config.hidden_size``.
    """

    @configurable
    def __init__(
        self,
        num_layers: int,
        channels: int,
        lang_config: BertConfig,
        in_channels: int | None = None,
        embed_dim: int = 2048,
        num_heads: int = 8,
        fusion_dropout: float = 0.1,
        drop_path: float = 0.0,
        init_values: float | None = None,
        use_dyrelu: bool = True,
        use_deform: bool = True,
        use_gn: bool = True,
        use_checkpoint: bool = False,
        last_text_layer: bool = True,
        deform_impl: str = "auto",
        dyconv_precision: str = "fp32",
    ):
        """``last_text_layer=False`` leaves the last layer without its BERT layer, as the official
        tower does when the head scores with the pre-fusion text (USE_FUSED_FEATURES_DOT_PRODUCT off).
        """
        super().__init__()
        in_channels = channels if in_channels is None else in_channels
        self.channels = channels
        # a tower without layers (the no-fusion ablation) has no layer scale to set
        init_values = 1.0 / max(num_layers, 1) if init_values is None else init_values
        self.use_checkpoint = use_checkpoint

        text_config = copy.deepcopy(lang_config)
        if getattr(text_config, "_attn_implementation", None) != "eager":
            text_config._attn_implementation = "sdpa"
        self.attn_implementation = text_config._attn_implementation

        layers = []
        for i in range(num_layers):
            c_in = in_channels if i == 0 else channels
            # As official: the first DyConv drops its dynamic parts when it changes the width.
            same_width = c_in == channels
            layers.append(
                VLDyHeadLayer(
                    BiAttentionBlock(c_in, text_config.hidden_size, embed_dim, num_heads,
                                     dropout=fusion_dropout, drop_path=drop_path, init_values=init_values),
                    BertLayer(text_config, layer_idx=i) if last_text_layer or i < num_layers - 1 else None,
                    DyConv(c_in, channels, use_dyrelu=use_dyrelu and same_width,
                           use_deform=use_deform and same_width, use_gn=use_gn, deform_impl=deform_impl,
                           precision=dyconv_precision),
                )
            )
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Sequence[ShapeSpec], lang_config: BertConfig) -> dict:
        """The tower over the backbone levels ``input_shape`` (finest first), text width from ``lang_config``."""
        widths = {shape.channels for shape in input_shape}
        if len(widths) != 1:
            raise ValueError(f"the fusion tower needs one width for every image level, got {sorted(widths)}")
        dyhead = cfg.MODEL.DYHEAD
        return {
            "num_layers": dyhead.NUM_LAYERS,
            "channels": dyhead.CHANNELS,
            "lang_config": lang_config,
            "in_channels": widths.pop(),
            "embed_dim": dyhead.FUSION.EMBED_DIM,
            "num_heads": dyhead.FUSION.NUM_HEADS,
            "fusion_dropout": dyhead.FUSION.DROPOUT,
            "drop_path": dyhead.FUSION.DROP_PATH,
            "init_values": dyhead.FUSION.LAYER_SCALE_INIT or None,  # 0: the tower's 1 / num_layers
            "use_gn": dyhead.USE_GN,
            "use_dyrelu": dyhead.USE_DYRELU,
            "use_deform": dyhead.USE_DEFORM,
            "use_checkpoint": dyhead.USE_CHECKPOINT,
            "last_text_layer": dyhead.SCORE_WITH_FUSED_TEXT,
            "deform_impl": dyhead.DEFORM_CONV_IMPL,
            "dyconv_precision": dyhead.DYCONV_PRECISION,
        }

    def output_shape(self, input_shape: Sequence[ShapeSpec]) -> list[ShapeSpec]:
        """The fused levels keep the input levels' strides at ``channels`` width."""
        return [ShapeSpec(channels=self.channels, stride=shape.stride) for shape in input_shape]

    def forward(
        self,
        features: list[Tensor],
        lang_hidden: Tensor,
        lang_mask: Tensor,
        caption_mode: bool = False,
    ) -> tuple[list[Tensor], Tensor]:
        """features: P3..P7 as (B, C, H, W); lang_hidden: (B, T, D) text encoder ``hidden``;
        lang_mask: (B, T) with 0 on padding. Padding the text to any length gives the same outputs
        at real positions, so batches may be padded to their longest prompt. ``caption_mode``: the
        image never reads the text and the text is causal (no gradient checkpointing there).
        """
        if caption_mode:
            image = self.encode_image(features)
            return image.features, self.decode_text(lang_hidden, lang_mask, image)
        text_mask = text_attention_mask(lang_mask, lang_hidden.dtype, self.attn_implementation)
        checkpointed = self.use_checkpoint and self.training and torch.is_grad_enabled()
        features = list(features)
        for layer in self.layers:
            if checkpointed:
                features, lang_hidden = torch.utils.checkpoint.checkpoint(
                    layer, features, lang_hidden, lang_mask, text_mask, use_reentrant=False
                )
            else:
                features, lang_hidden = layer(features, lang_hidden, lang_mask, text_mask)
        return features, lang_hidden

    def encode_image(self, features: list[Tensor]) -> CaptionImageSide:
        """Caption mode's image side from the backbone levels alone, once per image."""
        features, keys = list(features), []
        for layer in self.layers:
            features, layer_keys = layer.image_side(features)
            keys.append(layer_keys)
        return CaptionImageSide(features, keys)

    def decode_text(
        self, lang_hidden: Tensor, lang_mask: Tensor, image: CaptionImageSide, cache: Cache | None = None
    ) -> Tensor:
        """Caption mode's text side for the newest ``q`` tokens ``lang_hidden`` (B, q, D):
        ``lang_mask`` (B, K) covers the whole sequence, the ``K - q`` earlier tokens being those
        whose keys and values ``cache`` holds (all of them are given at once without a cache)."""
        mask = causal_attention_mask(lang_mask, lang_hidden.shape[1], lang_hidden.dtype, self.attn_implementation)
        for layer, keys in zip(self.layers, image.keys, strict=True):
            lang_hidden = layer.text_side(lang_hidden, keys, mask, cache)
        return lang_hidden
