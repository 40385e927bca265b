"""Reading images as every family receives them: decode to RGB, VLM-R1's small-image upscale, and the size limits
checked before anything is decoded. What a family then does with the pixels is its processor's job."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

from PIL import Image

from vlmr1_jax.models.pixels import to_rgb
from vlmr1_jax.models.processor import Processor

MIN_SIDE = 28  # VLM-R1 upscales images whose smaller side is below this
# Images longer than this many times their width (or the reverse) are refused: Qwen2-VL's resize cannot take them,
# and no family gets a useful picture from them.
MAX_ASPECT_RATIO = 200
# Cap on an ORIGINAL image's pixel count, checked from its header before any decode (a processor's max_pixels is only
# a resize target): 50 MP keeps 48-50 MP camera photos, refuses larger ones (a 60 MP image decodes to 180 MB of RGB)
# and sits below PIL's own decompression-bomb limits (Image.MAX_IMAGE_PIXELS = 89.5 MP warns, twice that raises).
MAX_IMAGE_PIXELS = 50_000_000


def upscaled_size(width: int, height: int, min_side: int = MIN_SIDE) -> tuple[int, int]:
    """VLM-R1's intended rule: a smaller side under `min_side` is scaled up to `min_side`, keeping the aspect
    ratio (the other side is truncated to an int, as VLM-R1 does). Returns (width, height), PIL's order."""
    if min(width, height) < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if min(width, height) >= min_side:
        return width, height
    if width < height:
        return min_side, int(height * (min_side / width))
    return int(width * (min_side / height)), min_side


def check_image_size(height: int, width: int) -> None:
    """ValueError for an image no processor can take: no pixels, or an aspect ratio over MAX_ASPECT_RATIO."""
    up_width, up_height = upscaled_size(width, height)
    ratio = max(up_height, up_width) / min(up_height, up_width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio} for {height}x{width}"
        )


def image_grid(processor: Processor, height: int, width: int, *, min_pixels: int, max_pixels: int) -> Sequence[int]:
    """The grid an original image of this size gets from `processor` (after the small-image upscale), without
    decoding it; ValueError where the processor cannot take it."""
    check_image_size(height, width)
    up_width, up_height = upscaled_size(width, height)
    return processor.image_grid(up_height, up_width, min_pixels=min_pixels, max_pixels=max_pixels)


def upscale_small_image(image: Image.Image, min_side: int = MIN_SIDE) -> Image.Image:
    """LANCZOS-upscale `image` to `upscaled_size` when its smaller side is under `min_side` (VLM-R1 behaviour)."""
    size = upscaled_size(*image.size, min_side=min_side)
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


def load_image(path: str | PathLike, upscale_small: bool = True) -> Image.Image:
    """Open an image file as RGB, upscaling it when its smaller side is under 28 px (VLM-R1 behaviour)."""
    try:
        with Image.open(path) as raw:
            image = to_rgb(raw)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from err
    return upscale_small_image(image) if upscale_small else image
