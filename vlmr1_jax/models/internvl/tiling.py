"""InternVL's dynamic tiling, as VLM-R1's InternVL module prepares images (`dynamic_preprocess` + its transform).

An image is resized to a grid of `cols x rows` 448-px tiles whose shape is closest to its aspect ratio (at most
`max_tiles` tiles), cut into tiles row-major, and followed by a 448x448 thumbnail of the whole image when there is
more than one tile. Every tile is scaled to [0, 1] and normalised with the ImageNet mean/std. Resizing is PIL bicubic
on the uint8 image (PIL's default filter for RGB, which VLM-R1's `image.resize` uses; its per-tile 448x448 bicubic
resize is then the identity). Numpy + PIL only.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from vlmr1_jax.models.pixels import as_rgb_array

TILE_SIZE = 448  # InternViT's input size (vision_config.image_size of every InternVL2.5/3 release)
TILE_PIXELS = TILE_SIZE * TILE_SIZE
MIN_TILES = 1  # VLM-R1's `min_num`
DEFAULT_MAX_TILES = 12  # VLM-R1's `max_anyres_num` default
IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet
IMAGE_STD = (0.229, 0.224, 0.225)


@functools.cache
def candidate_grids(max_tiles: int, min_tiles: int = MIN_TILES) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with min_tiles <= cols * rows <= max_tiles, sorted by tile count.

    VLM-R1 sorts a set, so grids of one tile count come in set order; that order never changes the choice: two
    grids with one tile count never tie (a grid of fewer tiles lies strictly between their aspect ratios).
    """
    if max_tiles < min_tiles or min_tiles < 1:
        raise ValueError(f"tile budget must satisfy 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    grids = [
        (cols, rows)
        for cols in range(1, max_tiles + 1)
        for rows in range(1, max_tiles + 1)
        if min_tiles <= cols * rows <= max_tiles
    ]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(
    width: int, height: int, max_tiles: int, min_tiles: int = MIN_TILES, tile: int = TILE_SIZE
) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to width / height; on an exact tie, a later (larger) grid wins
    while the image's area exceeds half of that grid's (InternVL's `find_closest_aspect_ratio`)."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(max_tiles, min_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def count_tiles(width: int, height: int, max_tiles: int, tile: int = TILE_SIZE) -> int:
    """Tiles an image of this size becomes: the grid's, plus the thumbnail when the grid has more than one."""
    cols, rows = choose_grid(width, height, max_tiles, tile=tile)
    return cols * rows + (1 if cols * rows > 1 else 0)


def tile_image(image: Image.Image | np.ndarray, max_tiles: int, tile: int = TILE_SIZE) -> list[Image.Image]:
    """The `tile` x `tile` (448) RGB tiles of `image`, row-major, then the thumbnail when there is more than one."""
    rgb = Image.fromarray(as_rgb_array(image))
    cols, rows = choose_grid(rgb.width, rgb.height, max_tiles, tile=tile)
    resized = rgb.resize((tile * cols, tile * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
    ]
    if len(tiles) > 1:
        tiles.append(rgb.resize((tile, tile), Image.Resampling.BICUBIC))
    return tiles


def normalize_tiles(tiles: list[Image.Image]) -> np.ndarray:
    """float32 [tiles, 3, 448, 448]: uint8 / 255, then (x - mean) / std per channel, in float32 as torchvision's
    ToTensor + Normalize compute it."""
    pixels = np.stack([np.asarray(t, np.uint8) for t in tiles]).astype(np.float32) / np.float32(255)
    mean = np.asarray(IMAGE_MEAN, np.float32)
    std = np.asarray(IMAGE_STD, np.float32)
    return np.ascontiguousarray(((pixels - mean) / std).transpose(0, 3, 1, 2))


def max_tiles_for(max_pixels: int, tile: int = TILE_SIZE) -> int:
    """The tile budget (VLM-R1's `max_anyres_num`) that `data.max_pixels` sets: whole `tile` x `tile` (448) tiles
    within it."""
    tiles = max_pixels // (tile * tile)
    if tiles < MIN_TILES:
        raise ValueError(
            f"data.max_pixels={max_pixels}: InternVL needs at least one {tile}x{tile} tile; set data.max_pixels to "
            f"max_anyres_num * {tile * tile} (VLM-R1's default 12 tiles: {DEFAULT_MAX_TILES * tile * tile})"
        )
    return tiles
