"""The CLIP BPE tokenizer of GLIPv2-B / -H, built offline.

Official GLIP reads prompts for its CLIP-type encoder with transformers' fast CLIP tokenizer
(``openai/clip-vit-base-patch32``, ``from_slow=True``): NFC, whitespace runs collapsed, lower-cased,
digits split one by one, byte-level BPE with ``</w>`` word ends, bos 49406, eos = pad 49407 (padding
is told apart by the attention mask only). Its vocabulary is OpenAI CLIP's
``bpe_simple_vocab_16e6.txt.gz``; the PyPI package open-clip-torch ships that file byte for byte, so
the same tokenizer is assembled here from it, never downloaded. With L_mlm, official GLIP reuses the
rare token ``ðŁĴĳ</w>`` (49404) as the mask token; it is set here always, which changes no id.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizerFast

__all__ = ["CLIP_MASK_TOKEN", "CLIP_TOKENIZER_NAME", "build_clip_tokenizer", "clip_bpe_file"]

CLIP_TOKENIZER_NAME = "clip"
CLIP_MASK_TOKEN = "ðŁĴĳ</w>"
CLIP_MODEL_MAX_LENGTH = 256  # GLIP's context; every caller states its own max_length anyway
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary minus the byte tokens and the two specials
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def clip_bpe_file() -> Path:
    """Path of the BPE merges file inside the installed open_clip package (not imported here)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The CLIP tokenizer's vocabulary comes from the package 'open-clip-torch', which is not "
            "installed: pip install open-clip-torch"
        )
    path = Path(spec.submodule_search_locations[0]) / _BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"open-clip-torch is installed but {path} is missing; reinstall open-clip-torch")
    return path


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP's printable stand-in for each byte value, in vocabulary order: printable
    Latin-1 bytes stand for themselves, the others take code points from 256 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in printable] + [symbols[b] for b in range(256) if b not in printable]


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(token -> id, merges) as OpenAI CLIP orders them: bytes, bytes + ``</w>``, one token per
    merge, then the two special tokens (49,408 ids)."""
    with gzip.open(clip_bpe_file(), "rt", encoding="utf-8") as f:
        merges = tuple(tuple(line.split()) for line in f.read().split("\n")[1 : _NUM_MERGES + 1])
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + list(_SPECIAL_TOKENS)
    return {token: i for i, token in enumerate(tokens)}, merges


def build_clip_tokenizer() -> CLIPTokenizerFast:
    """A fresh fast CLIP tokenizer (callers may change its settings) from the packaged vocabulary."""
    vocab, merges = _vocabulary()
    return CLIPTokenizerFast(
        vocab=dict(vocab), merges=list(merges), mask_token=CLIP_MASK_TOKEN, model_max_length=CLIP_MODEL_MAX_LENGTH,
    )
