"""Registry of text encoders, so configs pick EncL by name (BERT for GLIPv2-T, the CLIP type for -B / -H)."""

from __future__ import annotations

from pathlib import Path

from detectron2.config import CfgNode
from detectron2.utils.registry import Registry
from torch import nn
from transformers import BertConfig

from .bert import BertTextEncoder
from .clip_text import ClipTextConfig, ClipTextEncoder, load_clip_text_weights
from .tokenizer import minilm_model_dir

__all__ = ["LANGUAGE_BACKBONE_REGISTRY", "build_bert_language_backbone", "build_clip_language_backbone",
           "build_language_backbone", "resolve_text_model_path"]

LANGUAGE_BACKBONE_REGISTRY = Registry("LANGUAGE_BACKBONE")
LANGUAGE_BACKBONE_REGISTRY.__doc__ = """
Text encoders. A registered builder takes the config and returns an nn.Module with `hidden_size`,
`model.config` and forward(input_ids, attention_mask) -> {"hidden", "embedded", "aggregate", "masks"}.
"""

MINILM_NAME = "minilm"


def resolve_text_model_path(name_or_path: str) -> str:
    """"minilm" -> the pretrained MiniLM folder shipped on PyPI; anything else unchanged."""
    return str(minilm_model_dir()) if name_or_path == MINILM_NAME else name_or_path


@LANGUAGE_BACKBONE_REGISTRY.register()
def build_bert_language_backbone(cfg: CfgNode) -> BertTextEncoder:
    """BERT from cfg.MODEL.LANGUAGE_BACKBONE.

    LOAD_PRETRAINED: weights from MODEL_PATH (a local folder, or a hub name when online).
    Otherwise random init with MODEL_PATH's architecture (bert-base-uncased's is built in), the usual
    case when a converted GLIP / GLIPv2 checkpoint provides every weight.
    """
    lang = cfg.MODEL.LANGUAGE_BACKBONE
    path = resolve_text_model_path(lang.MODEL_PATH)
    overrides = {"num_hidden_layers": lang.NUM_HIDDEN_LAYERS} if lang.NUM_HIDDEN_LAYERS > 0 else {}
    if lang.LOAD_PRETRAINED:
        return BertTextEncoder.from_pretrained(
            path, lang.NUM_LAST_LAYERS, use_checkpoint=lang.USE_CHECKPOINT, config_overrides=overrides
        )
    if Path(path).is_dir():
        config = BertConfig.from_pretrained(path, **overrides)
    elif path == "bert-base-uncased":
        config = BertConfig(**overrides)
    else:
        raise FileNotFoundError(
            f"MODEL.LANGUAGE_BACKBONE.MODEL_PATH={lang.MODEL_PATH!r} is neither a local folder nor "
            "'bert-base-uncased' / 'minilm'"
        )
    return BertTextEncoder(config, lang.NUM_LAST_LAYERS, use_checkpoint=lang.USE_CHECKPOINT)


@LANGUAGE_BACKBONE_REGISTRY.register()
def build_clip_language_backbone(cfg: CfgNode) -> ClipTextEncoder:
    """The CLIP-type text transformer of GLIPv2-B / -H from cfg.MODEL.CLIP (depth overridden by
    MODEL.LANGUAGE_BACKBONE.NUM_HIDDEN_LAYERS when set). LOAD_PRETRAINED: its weights from the UniCL /
    CLIP checkpoint file MODEL_PATH ("text." tensors, positional table resized to the context)."""
    lang, clip = cfg.MODEL.LANGUAGE_BACKBONE, cfg.MODEL.CLIP
    if lang.MAX_QUERY_LEN > clip.CONTEXT_LENGTH:
        raise ValueError(
            f"MODEL.LANGUAGE_BACKBONE.MAX_QUERY_LEN={lang.MAX_QUERY_LEN} exceeds the CLIP text context "
            f"MODEL.CLIP.CONTEXT_LENGTH={clip.CONTEXT_LENGTH}: the positional table has no row for the extra tokens"
        )
    config = ClipTextConfig(
        width=clip.WIDTH, layers=lang.NUM_HIDDEN_LAYERS or clip.LAYERS, heads=clip.HEADS,
        context_length=clip.CONTEXT_LENGTH, vocab_size=clip.VOCAB_SIZE,
    )
    encoder = ClipTextEncoder(config, use_checkpoint=lang.USE_CHECKPOINT)
    if lang.LOAD_PRETRAINED:
        load_clip_text_weights(encoder.model, lang.MODEL_PATH)
    return encoder


def build_language_backbone(cfg: CfgNode) -> nn.Module:
    """The text encoder named by cfg.MODEL.LANGUAGE_BACKBONE.NAME."""
    return LANGUAGE_BACKBONE_REGISTRY.get(cfg.MODEL.LANGUAGE_BACKBONE.NAME)(cfg)
