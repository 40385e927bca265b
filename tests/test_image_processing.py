"""Qwen2.5-VL's image processing (models/qwen2_5_vl/image.py) against transformers' PIL-backend
Qwen2VLImageProcessor and hand-computed tables.

The reference processor is built offline from the Qwen2.5-VL preprocessor_config values (docs/facts.md: Processor).
Videos are checked against the same image processor run frame by frame (the 5.x video processor needs torchvision,
which is not installed), re-assembled into the [C, Tp, 14, 14] row layout.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vlmr1_jax.models.qwen2_5_vl.image import (
    MAX_PIXELS,
    MIN_PIXELS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    preprocess_image,
    preprocess_video,
    smart_resize,
    tokens_for_grid,
)
from vlmr1_jax.processing.image import load_image

# (height, width, max_pixels): tiny (incl. below 28 and round-half-to-even heights), aspect ratios up to 200,
# big images downscaled under a lowered max_pixels to keep the test fast, then seeded random sizes.
EDGE_SIZES = [
    (28, 28, MAX_PIXELS),
    (29, 30, MAX_PIXELS),
    (27, 28, MAX_PIXELS),
    (10, 40, MAX_PIXELS),
    (3, 500, MAX_PIXELS),
    (42, 70, MAX_PIXELS),
    (70, 98, MAX_PIXELS),
    (56, 11200, MAX_PIXELS),
    (3000, 15, MAX_PIXELS),
    (20, 3990, MAX_PIXELS),
    (1500, 2000, 256 * 28 * 28),
    (4000, 300, 100_000),
    (900, 1600, 64 * 28 * 28),
]
RANDOM_SIZES = [(int(h), int(w), MAX_PIXELS) for h, w in np.random.default_rng(1234).integers(28, 700, size=(20, 2))]


@pytest.fixture(scope="module")
def hf_processor() -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2
    )


def _random_image(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def _hf(
    processor: Qwen2VLImageProcessorPil, image: Image.Image, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int, int]]:
    out = processor(images=[image], size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    return np.asarray(out["pixel_values"]), tuple(int(v) for v in out["image_grid_thw"][0])


@pytest.mark.parametrize("height,width,max_pixels", EDGE_SIZES + RANDOM_SIZES)
def test_image_matches_hf_pil_processor(hf_processor, height, width, max_pixels):
    image = _random_image(height, width, seed=height * 7919 + width)
    ref_pixels, ref_grid = _hf(hf_processor, image, max_pixels=max_pixels)
    pixels, grid = preprocess_image(image, max_pixels=max_pixels)
    assert grid == ref_grid
    assert tokens_for_grid(grid) * 4 == ref_pixels.shape[0]
    assert pixels.dtype == np.float32 and pixels.shape == ref_pixels.shape == (ref_pixels.shape[0], 1176)
    np.testing.assert_allclose(pixels, ref_pixels, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_non_rgb_modes_match_hf(hf_processor, mode):
    image = _random_image(45, 61, seed=5, mode=mode)
    ref_pixels, ref_grid = _hf(hf_processor, image)
    pixels, grid = preprocess_image(image)
    assert grid == ref_grid
    np.testing.assert_allclose(pixels, ref_pixels, rtol=0, atol=1e-5)


def test_uint8_array_input_equals_pil_input():
    image = _random_image(50, 77, seed=3)
    np.testing.assert_array_equal(preprocess_image(np.asarray(image))[0], preprocess_image(image)[0])


@pytest.mark.parametrize(
    "size,resized,grid,tokens",
    [
        ((700, 1000), (700, 1008), (1, 50, 72), 900),  # the processor example
        ((42, 70), (56, 56), (1, 4, 4), 4),  # 42/28 = 1.5 and 70/28 = 2.5 both round half-to-even to 2
        ((28, 28), (56, 56), (1, 4, 4), 4),  # 784 < min_pixels 3136: scaled up by sqrt(4) = 2
        ((10, 40), (28, 112), (1, 2, 8), 4),
    ],
)
def test_hand_computed_grids(size, resized, grid, tokens):
    assert smart_resize(*size) == resized
    assert preprocess_image(_random_image(*size, seed=0))[1] == grid
    assert tokens_for_grid(grid) == tokens


def test_aspect_ratio_over_200_is_rejected(hf_processor):
    image = _random_image(10, 2010, seed=0)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(image)
    with pytest.raises(ValueError, match="aspect ratio"):
        _hf(hf_processor, image)


def _hf_video_rows(processor, frames: list[Image.Image], min_pixels: int, max_pixels: int) -> np.ndarray:
    """Video rows from per-frame HF image rows: row [C, Tp, 14, 14] takes frame 2t at Tp=0 and 2t+1 at Tp=1."""
    per_frame = [_hf(processor, f, min_pixels, max_pixels)[0].reshape(-1, 3, 2, 14, 14)[:, :, 0] for f in frames]
    per_frame += [per_frame[-1]] * (len(per_frame) % 2)
    pairs = [np.stack(per_frame[i : i + 2], axis=2) for i in range(0, len(per_frame), 2)]
    return np.concatenate(pairs).reshape(-1, 1176)


@pytest.mark.parametrize("num_frames,fps", [(2, 2.0), (3, 2.0), (4, 1.0), (5, 4.0)])
def test_video_matches_per_frame_hf(hf_processor, num_frames, fps):
    frames = [_random_image(60, 90, seed=100 + i) for i in range(num_frames)]
    pixels, grid, second_per_grid = preprocess_video(frames, fps=fps, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    h, w = smart_resize(60, 90)
    assert grid == ((num_frames + 1) // 2, h // 14, w // 14)
    assert second_per_grid == 2 / fps
    assert tokens_for_grid(grid) == grid[0] * grid[1] * grid[2] // 4
    np.testing.assert_allclose(pixels, _hf_video_rows(hf_processor, frames, MIN_PIXELS, MAX_PIXELS), rtol=0, atol=1e-5)


def test_video_array_input_and_default_video_limits():
    frames = np.random.default_rng(0).integers(0, 256, size=(3, 60, 90, 3), dtype=np.uint8)
    pixels, grid, second_per_grid = preprocess_video(frames)
    # 60x90 is below 128*28*28 pixels: beta = sqrt(100352 / 5400); ceil(60*beta/28)*28 = 280, ceil(90*beta/28)*28 = 392
    assert (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS) == (100352, 602112)
    assert grid == (2, 20, 28) and second_per_grid == 1.0
    list_pixels = preprocess_video([Image.fromarray(f) for f in frames])[0]
    np.testing.assert_array_equal(pixels, list_pixels)
    # the padded last pair holds frame 2 twice
    last = pixels[-20 * 28 :].reshape(-1, 3, 2, 14, 14)
    np.testing.assert_array_equal(last[:, :, 0], last[:, :, 1])


@pytest.mark.parametrize(
    "size,expected",
    [
        ((10, 40), (28, 112)),
        ((40, 10), (112, 28)),
        ((20, 20), (28, 28)),
        ((27, 100), (28, 103)),
        ((100, 27), (103, 28)),
        ((28, 5), (156, 28)),
        ((100, 30), (100, 30)),
    ],
)
def test_load_image_upscales_small_side_to_28(tmp_path, size, expected):
    image = _random_image(size[1], size[0], seed=1)  # PIL size is (width, height)
    path = tmp_path / "small.png"
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == expected
    reference = image if expected == size else image.resize(expected, Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(reference))
    assert load_image(path, upscale_small=False).size == size


def test_load_image_composites_alpha_on_white_and_names_bad_files(tmp_path):
    rgba = np.zeros((30, 30, 4), dtype=np.uint8)
    rgba[:15, :, :] = (10, 20, 30, 255)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    loaded = np.asarray(load_image(tmp_path / "alpha.png"))
    assert tuple(loaded[0, 0]) == (10, 20, 30) and tuple(loaded[-1, -1]) == (255, 255, 255)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.png"):
        load_image(tmp_path / "bad.png")
