"""The demo's picture (held-out images with true and predicted boxes) and the sft-vs-rl figure and table."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmr1_jax.train.box_grid import Predicted, Shown, draw_box_grid
from vlmr1_jax.train.comparison import comparison_table, draw_comparison

SPLITS = {"val": "in domain", "ood": "out of domain"}


def _image(path, colour=(30, 30, 30)):
    Image.new("RGB", (112, 112), colour).save(path)
    return str(path)


def _magenta(png) -> int:
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] > 200)).sum())


def test_box_grid_draws_one_row_per_stage_and_the_predicted_boxes(tmp_path):
    shown = [Shown(_image(tmp_path / f"{i}.png"), f"the red circle {i}", [10, 10, 50, 50]) for i in range(3)]
    stages = {
        "after SFT": [Predicted([0, 0, 20, 20], 0.1)] * 3,
        "after GRPO": [Predicted([10, 10, 50, 50], 1.0)] * 3,
    }
    path = draw_box_grid(shown, stages, tmp_path / "grid" / "boxes.png")
    width, height = Image.open(path).size
    assert (width, height) == (3 * 190, (2 * 210 + 40))  # 3 columns, 2 rows (figure inches x 100 dpi)
    assert _magenta(path) > 0
    # Without a visible prediction (a box outside the image, e.g. an unparsable answer's [0, 0, 0, 0]) no magenta.
    none = draw_box_grid(shown, {"after SFT": [Predicted([500, 500, 600, 600], 0.0)] * 3}, tmp_path / "none.png")
    assert _magenta(none) == 0


def test_box_grid_names_a_stage_whose_predictions_do_not_match(tmp_path):
    shown = [Shown(_image(tmp_path / "a.png"), "the red circle", [1, 1, 5, 5])]
    with pytest.raises(ValueError, match="'after GRPO' has 2 predictions for 1 samples"):
        draw_box_grid(shown, {"after GRPO": [Predicted([1, 1, 5, 5], 1.0)] * 2}, tmp_path / "x.png")


def _rows():
    """Two seeds; the warm start (step 0) is shared by both methods; values chosen by hand."""
    rows = []
    for seed in (0, 1):
        for method in ("sft", "grpo"):
            for split in SPLITS:
                rows.append(
                    dict(method=method, seed=seed, step=0, split=split, protocol="r1", accuracy=0.1, mean_iou=0.2)
                )
    final = {  # (method, seed, split) -> (accuracy, mean_iou) at step 20
        ("sft", 0, "val"): (0.30, 0.40),
        ("sft", 1, "val"): (0.50, 0.60),
        ("sft", 0, "ood"): (0.10, 0.20),
        ("sft", 1, "ood"): (0.20, 0.30),
        ("grpo", 0, "val"): (0.40, 0.45),
        ("grpo", 1, "val"): (0.60, 0.55),
        ("grpo", 0, "ood"): (0.30, 0.35),
        ("grpo", 1, "ood"): (0.40, 0.45),
    }
    for (method, seed, split), (acc, iou) in final.items():
        rows.append(dict(method=method, seed=seed, step=20, split=split, protocol="r1", accuracy=acc, mean_iou=iou))
        rows.append(dict(method=method, seed=seed, step=20, split=split, protocol="other", accuracy=9.0, mean_iou=9.0))
    return rows


def test_comparison_table_reports_mean_and_range_over_seeds():
    table = comparison_table(_rows(), SPLITS, "r1")
    lines = table.splitlines()
    assert lines[0] == (
        "| | step | in domain Acc@0.5 (%) | in domain mean IoU | out of domain Acc@0.5 (%) | out of domain mean IoU |"
    )
    assert lines[2] == "| warm start | 0 | 10.0 | 0.200 | 10.0 | 0.200 |"
    # SFT in domain: acc (30 + 50) / 2 = 40 in [30, 50]; IoU (0.4 + 0.6) / 2; out of domain (10 + 20) / 2 ...
    assert lines[3] == "| SFT | 20 | 40.0 (30.0-50.0) | 0.500 (0.400-0.600) | 15.0 (10.0-20.0) | 0.250 (0.200-0.300) |"
    assert lines[4] == "| GRPO | 20 | 50.0 (40.0-60.0) | 0.500 (0.450-0.550) | 35.0 (30.0-40.0) | 0.400 (0.350-0.450) |"
    assert "| GRPO | 1 | 20 | 60.0 | 0.550 | 40.0 | 0.450 |" in lines


def test_comparison_figure_is_written(tmp_path):
    path = draw_comparison(_rows(), SPLITS, "r1", tmp_path / "sft-vs-rl.png")
    assert Image.open(path).size == (2 * 520, 2 * 340)


def test_comparison_table_refuses_rows_without_the_protocol():
    with pytest.raises(ValueError, match="protocol 'baseline'"):
        comparison_table(_rows(), SPLITS, "baseline")
