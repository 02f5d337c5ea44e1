"""Checks of what a page sends, each failing with a sentence for the page: an empty or overlong
prompt, a file that is no image, an image too large to decode safely. Big photos are shrunk
before the model sees them (it resizes to about a thousand pixels anyway)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "MAX_DECODED_PIXELS",
    "MAX_PROMPT_CHARS",
    "MAX_SIDE",
    "DemoInputError",
    "check_prompt",
    "read_upload",
    "split_names",
]

MAX_PROMPT_CHARS = 2000  # far above any useful prompt (the text encoder reads at most 256 tokens)
MAX_DECODED_PIXELS = 80_000_000  # larger images are refused before decoding (about 240 MB of RGB)
MAX_SIDE = 2048  # larger images are shrunk to this longest side before inference


class DemoInputError(ValueError):
    """Input the page must refuse; the message is shown to the user as it is."""


def check_prompt(prompt: str | None, what: str) -> str:
    """The trimmed prompt, or a DemoInputError saying what is missing or too long."""
    text = (prompt or "").strip()
    if not text:
        raise DemoInputError(f"The prompt is empty: type {what}.")
    if len(text) > MAX_PROMPT_CHARS:
        raise DemoInputError(f"The prompt has {len(text):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted "
                             "(the model reads at most 256 tokens).")
    return text


def split_names(text: str) -> list[str]:
    """Comma-separated names without empty entries ("a, ,b," -> ["a", "b"])."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise DemoInputError("The prompt names no category: separate names with commas.")
    return names


def read_upload(path: str | Path) -> tuple[np.ndarray, str]:
    """An uploaded file as a BGR uint8 array (EXIF rotation applied, shrunk to MAX_SIDE) and a note
    for the page ("" when nothing was changed)."""
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_DECODED_PIXELS:
                    raise DemoInputError(f"{name} is {width} x {height} pixels; images above "
                                         f"{MAX_DECODED_PIXELS // 1_000_000} megapixels are refused.")
                image = ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as error:
        raise DemoInputError(f"{name} is not an image that can be read ({type(error).__name__}): "
                             "upload a JPEG, PNG, BMP, TIFF or WebP file.") from error
    note = ""
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        note = f"The {width} x {height} image was shrunk to {image.size[0]} x {image.size[1]} for the model."
    return np.ascontiguousarray(np.asarray(image)[:, :, ::-1]), note
