"""Reading user images into the model's format, converting what can be converted.

Grayscale, palette, RGBA and 16-bit images are turned into 8-bit 3-channel images the way a user
expects (16-bit intensities are rescaled, not clipped); a file that cannot be decoded raises an
error naming it.

Float arrays follow one rule: every value must be finite and lie in [0, 1], which is scaled to
0..255. Anything else is refused with the range seen, never clipped: a float image in 0..255
clipped to [0, 1] would come out nearly white, and NaN pixels would turn black.
"""

from pathlib import Path

import numpy as np
from detectron2.data.detection_utils import _apply_exif_orientation
from PIL import Image, UnidentifiedImageError

HIGH_BIT_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL image -> HxWx3 uint8 RGB.

    RGBA/LA/P lose their alpha as PIL's convert("RGB") does (also what official GLIP does);
    high bit-depth grayscale is scaled by its type's range, since convert() would saturate it.
    """
    if image.mode in HIGH_BIT_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_image(path: str | Path, format: str = "BGR") -> np.ndarray:
    """Decode an image file (EXIF orientation applied) into HxWx3 uint8 in `format` (BGR or RGB)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"image path is a directory, not an image file: {path}")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            rgb = pil_to_rgb(_apply_exif_orientation(image))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    return rgb[:, :, ::-1].copy() if format == "BGR" else rgb


def array_to_bgr(image: np.ndarray, format: str = "BGR") -> np.ndarray:
    """An in-memory image (HxW, HxWx1/3/4; uint8, uint16 or float in [0,1]) -> HxWx3 uint8 BGR.

    `format` names the channel order of a 3/4-channel input ("BGR" as OpenCV, "RGB" as PIL).
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) == 0:
        raise ValueError(f"image must be HxW, HxWx1, HxWx3 or HxWx4 with H, W > 0; got shape {image.shape}")
    if image.dtype == np.uint16:
        image = (image.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(image.dtype, np.floating):
        image = (_checked_unit_range(image) * 255.0 + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {image.dtype}; use uint8, uint16 or float in [0, 1]")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    image = image[:, :, :3]
    if format == "RGB":
        image = image[:, :, ::-1]
    return np.ascontiguousarray(image)


def _checked_unit_range(image: np.ndarray) -> np.ndarray:
    """A float image, refused unless every value is finite and in [0, 1] (see the module doc)."""
    if not np.isfinite(image).all():
        raise ValueError(f"float image has {int((~np.isfinite(image)).sum())} NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        hint = "; for 0..255 values pass image.astype(np.uint8)" if high <= 255.0 and low >= 0.0 else ""
        raise ValueError(f"float image values must lie in [0, 1], got [{low:g}, {high:g}]{hint}")
    return image
