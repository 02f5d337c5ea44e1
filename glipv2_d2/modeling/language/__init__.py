"""Text encoders (EncL) and the tokenizer that feeds them."""

from .bert import BertTextEncoder
from .build import LANGUAGE_BACKBONE_REGISTRY, build_bert_language_backbone, build_language_backbone
from .tokenizer import OFFLINE_BERT_NAMES, build_tokenizer, minilm_model_dir

__all__ = [
    "LANGUAGE_BACKBONE_REGISTRY",
    "OFFLINE_BERT_NAMES",
    "BertTextEncoder",
    "build_bert_language_backbone",
    "build_language_backbone",
    "build_tokenizer",
    "minilm_model_dir",
]
