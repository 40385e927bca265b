"""Qwen2-VL image processing: smart_resize, normalisation and patchify in the processor's row order.

Numpy + PIL only (no torch, no jax). We match the *PIL* backend of transformers' `Qwen2VLImageProcessor`
(`Qwen2VLImageProcessorPil` in 5.x, the only "slow" processor in 4.x): resize is PIL bicubic on the uint8 image,
then rescale by 1/255 and CLIP mean/std normalisation. Why PIL: it is what VLM-R1 trained with (transformers 4.49,
slow processor), it needs no torch/torchvision in the JAX core, and torchvision's bicubic gives different pixels
(docs/facts.md: Processor). Grids and token counts do not depend on the backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from vlmr1_jax.models.pixels import as_rgb_array

IMAGE_FACTOR = 28
MIN_PIXELS = 3136  # 4 * 28 * 28, Qwen2.5-VL preprocessor_config.json
MAX_PIXELS = 12845056  # 16384 * 28 * 28
MAX_RATIO = 200
VIDEO_MIN_PIXELS = 128 * 28 * 28  # Qwen2VLVideoProcessor / qwen-vl-utils per-frame defaults
VIDEO_MAX_PIXELS = 768 * 28 * 28
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176


def smart_resize(
    height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """The (height, width) the processor resizes to: multiples of `factor`, pixel count within [min, max]."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, got "
            f"{max(height, width) / min(height, width)} for {height}x{width}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _resize_normalise(image: Image.Image | np.ndarray, min_pixels: int, max_pixels: int) -> np.ndarray:
    """smart_resize + PIL bicubic + rescale 1/255 + CLIP normalisation; returns float32 [3, H, W]."""
    array = as_rgb_array(image)
    height, width = array.shape[:2]
    new_h, new_w = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    resized = np.asarray(Image.fromarray(array).resize((new_w, new_h), Image.Resampling.BICUBIC))
    mean = np.asarray(IMAGE_MEAN, dtype=np.float64)
    std = np.asarray(IMAGE_STD, dtype=np.float64)
    normalised = (resized.astype(np.float64) / 255.0 - mean) / std
    return normalised.astype(np.float32).transpose(2, 0, 1)


def patchify(frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[T, C, H, W] (T a multiple of 2, H and W multiples of 28) -> rows [C*2*14*14] in the processor's order
    t -> h/2 -> w/2 -> 2 -> 2, each row laid out [C, Tp, 14, 14]; also returns grid_thw."""
    num_frames, channels, height, width = frames.shape
    if num_frames % TEMPORAL_PATCH_SIZE or height % IMAGE_FACTOR or width % IMAGE_FACTOR:
        raise ValueError(
            f"patchify needs T % {TEMPORAL_PATCH_SIZE} == 0 and H, W % {IMAGE_FACTOR} == 0, "
            f"got T={num_frames}, H={height}, W={width}"
        )
    grid_t = num_frames // TEMPORAL_PATCH_SIZE
    grid_h, grid_w = height // PATCH_SIZE, width // PATCH_SIZE
    blocks = frames.reshape(
        grid_t,
        TEMPORAL_PATCH_SIZE,
        channels,
        grid_h // MERGE_SIZE,
        MERGE_SIZE,
        PATCH_SIZE,
        grid_w // MERGE_SIZE,
        MERGE_SIZE,
        PATCH_SIZE,
    )
    # (t, tp, c, bh, mh, ph, bw, mw, pw) -> (t, bh, bw, mh, mw, c, tp, ph, pw)
    rows = blocks.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = rows.reshape(grid_t * grid_h * grid_w, channels * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE)
    return np.ascontiguousarray(rows, dtype=np.float32), (grid_t, grid_h, grid_w)


def preprocess_image(
    image: Image.Image | np.ndarray, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (pixel_values float32 [h*w, 1176], grid_thw (1, h, w)); the frame is repeated Tp=2 times."""
    frame = _resize_normalise(image, min_pixels, max_pixels)
    return patchify(np.repeat(frame[None], TEMPORAL_PATCH_SIZE, axis=0))


def preprocess_video(
    frames: Sequence[Image.Image] | np.ndarray,
    fps: float = 2.0,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
) -> tuple[np.ndarray, tuple[int, int, int], float]:
    """Sampled frames (PIL images or uint8 [F, H, W, 3]) -> (pixel_values, grid_thw, second_per_grid_ts).

    Frames are padded to an even count by repeating the last one; second_per_grid_ts = 2 / fps."""
    if len(frames) == 0:
        raise ValueError("preprocess_video needs at least one frame")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    arrays = [as_rgb_array(frame) for frame in frames]
    if len({array.shape for array in arrays}) != 1:
        raise ValueError(f"all video frames must have the same size, got {sorted({a.shape for a in arrays})}")
    processed = [_resize_normalise(array, min_pixels, max_pixels) for array in arrays]
    processed += [processed[-1]] * (-len(processed) % TEMPORAL_PATCH_SIZE)
    pixel_values, grid_thw = patchify(np.stack(processed))
    return pixel_values, grid_thw, TEMPORAL_PATCH_SIZE / fps


def tokens_for_grid(grid_thw: Sequence[int]) -> int:
    """Number of LLM tokens (<|image_pad|> / <|video_pad|> copies) for one item: t*h*w / merge_size**2."""
    grid_t, grid_h, grid_w = (int(v) for v in grid_thw)
    return grid_t * grid_h * grid_w // (MERGE_SIZE * MERGE_SIZE)
