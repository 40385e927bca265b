"""The demo's easier synthetic data: shapes of 24-48 px whose footprints sit on an 8-px grid (data/synthetic.py's
`Placement`); the default placement is any pixel and 16-48 px (tests/test_data_synthetic.py checks that data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.shapes import colour_mask
from vlmr1_jax.data import synthetic

GRID = synthetic.Placement(min_size=24, grid=8)


def _records(out: Path, placement: synthetic.Placement, split: str = "train", n: int = 24) -> list[dict]:
    path = synthetic.generate(str(out), n, seed=3, split=split, placement=placement)
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_grid_placement_puts_boxes_on_the_grid(tmp_path):
    records = _records(tmp_path, GRID) + _records(tmp_path, GRID, "ood")
    for r in records:
        pixels = np.asarray(Image.open(tmp_path / "images" / r["image"]))
        for o in r["objects"]:
            x1, y1, x2, y2 = o["box"]
            # The painted pixels are the box (read back from the image, not from the generator).
            ys, xs = np.nonzero(colour_mask(pixels, o["colour"]))
            inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
            assert inside.sum() > 0.3 * (x2 - x1) * (y2 - y1)
            if o["shape"] != "star":  # a star's points do not reach its footprint's corners
                assert all(v % 8 == 0 for v in o["box"]), o
                assert 24 <= x2 - x1 <= 48 and x2 - x1 == y2 - y1, o
            else:
                assert x1 % 8 <= 2 and y1 % 8 == 0 and max(x2 - x1, y2 - y1) >= 21, o


def test_default_placement_is_any_pixel_and_down_to_16_px(tmp_path):
    boxes = [o["box"] for r in _records(tmp_path, synthetic.Placement(), n=40) for o in r["objects"]]
    assert any(v % 8 for box in boxes for v in box)
    assert min(max(b[2] - b[0], b[3] - b[1]) for b in boxes) < 24


def test_bad_placement_is_refused(tmp_path):
    with pytest.raises(ValueError, match="min_size <= max_size"):
        synthetic.generate(str(tmp_path), 1, seed=0, placement=synthetic.Placement(min_size=50, max_size=48))
