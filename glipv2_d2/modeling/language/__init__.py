"""Text encoders (EncL) and the tokenizer that feeds them."""

from .bert import BertTextEncoder
from .build import (
    LANGUAGE_BACKBONE_REGISTRY,
    build_bert_language_backbone,
    build_clip_language_backbone,
    build_language_backbone,
)
from .clip_text import ClipTextConfig, ClipTextEncoder
from .clip_tokenizer import CLIP_TOKENIZER_NAME, build_clip_tokenizer
from .tokenizer import OFFLINE_BERT_NAMES, build_tokenizer, minilm_model_dir

__all__ = [
    "CLIP_TOKENIZER_NAME",
    "LANGUAGE_BACKBONE_REGISTRY",
    "OFFLINE_BERT_NAMES",
    "BertTextEncoder",
    "ClipTextConfig",
    "ClipTextEncoder",
    "build_bert_language_backbone",
    "build_clip_language_backbone",
    "build_clip_tokenizer",
    "build_language_backbone",
    "build_tokenizer",
    "minilm_model_dir",
]
