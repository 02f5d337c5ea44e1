"""Photos shipped with scikit-image, so that the demos run on a real picture without any download."""

from __future__ import annotations

import numpy as np

__all__ = ["BUILTIN_IMAGES", "builtin_image"]

BUILTIN_IMAGES = ("astronaut", "chelsea", "coffee", "rocket")


def builtin_image(name: str) -> np.ndarray:
    """An RGB photo from scikit-image, returned BGR like a file read by the predictor."""
    if name not in BUILTIN_IMAGES:
        raise ValueError(f"unknown built-in image {name!r}; choose one of {BUILTIN_IMAGES}")
    import skimage.data

    rgb = getattr(skimage.data, name)()
    return np.ascontiguousarray(rgb[:, :, ::-1])
