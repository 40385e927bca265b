"""RGB uint8 pixels from PIL images or arrays: the one input format every family's image processing starts from."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparency is composited onto white, as the HF processors do."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] view of a PIL image or an RGB/grey uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 [H, W] or [H, W, 3], got dtype {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image arrays must be uint8 [H, W] or [H, W, 3], got shape {array.shape}")
    return array
