"""The synthetic data's paint colours and shape fills, read back from the pixels by the data tests."""

from __future__ import annotations

import math

import numpy as np

RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40)}
# Fill of the tight box by the shape, from geometry: square 1, disc pi/4, triangle 1/2,
# 5-point star with inner radius 0.45 r: area 5 r^2 0.45 sin 36deg over box 2r cos 18deg x r(1 + cos 36deg).
STAR_FILL = 5 * 0.45 * math.sin(math.radians(36)) / (2 * math.cos(math.radians(18)) * (1 + math.cos(math.radians(36))))
FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5, "star": STAR_FILL}


def colour_mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    """Pixels within noise (sigma 8) of a paint colour; the dark background is >= 140 away in some channel."""
    return np.all(np.abs(pixels.astype(int) - RGB[colour]) <= 45, axis=-1)
