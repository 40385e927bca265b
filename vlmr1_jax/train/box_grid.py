"""A picture of what a REC model learned: held-out images with the ground-truth box and each stage's predicted box.

One row per stage (e.g. after SFT, after GRPO), one column per image, so a reader sees at a glance whether the
boxes land on the named object. Boxes are [x1, y1, x2, y2] in the image's own pixels (x2 / y2 exclusive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

TRUTH_COLOUR = "white"
PREDICTION_COLOUR = "magenta"


@dataclass(frozen=True)
class Shown:
    """One held-out sample as drawn: its image file, caption (the referring expression) and true box."""

    image: str
    caption: str
    truth: Sequence[float]


@dataclass(frozen=True)
class Predicted:
    """A stage's answer for one sample: its box (original pixels) and that box's IoU with the truth."""

    box: Sequence[float]
    iou: float


def _rectangle(box: Sequence[float], colour: str, style: str) -> Rectangle:
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.6, ls=style)


def draw_box_grid(shown: Sequence[Shown], stages: Mapping[str, Sequence[Predicted]], out: str | Path) -> Path:
    """Save a grid (rows: `stages` in order, columns: `shown`) with the true box dashed white and the predicted
    box solid magenta, each cell titled with its IoU; returns the PNG path."""
    if not shown or not stages:
        raise ValueError("draw_box_grid needs at least one sample and one stage")
    for name, predictions in stages.items():
        if len(predictions) != len(shown):
            raise ValueError(f"stage {name!r} has {len(predictions)} predictions for {len(shown)} samples")
    fig = Figure(figsize=(1.9 * len(shown), 2.1 * len(stages) + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(stages), len(shown), squeeze=False)
    for row, (name, predictions) in enumerate(stages.items()):
        for col, (sample, predicted) in enumerate(zip(shown, predictions)):
            ax = axes[row][col]
            with Image.open(sample.image) as img:
                pixels = np.asarray(img.convert("RGB"))
            ax.imshow(pixels, interpolation="nearest")
            ax.add_patch(_rectangle(sample.truth, TRUTH_COLOUR, "--"))
            ax.add_patch(_rectangle(predicted.box, PREDICTION_COLOUR, "-"))
            title = f"IoU {predicted.iou:.2f}"
            ax.set_title(f"{sample.caption}\n{title}" if row == 0 else title, fontsize=8)
            ax.set_xlim(-0.5, pixels.shape[1] - 0.5)  # a box off the image is clipped, not zoomed out to
            ax.set_ylim(pixels.shape[0] - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(f"held-out samples: true box dashed {TRUTH_COLOUR}, predicted box {PREDICTION_COLOUR}", fontsize=9)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
