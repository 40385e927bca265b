"""`vlmr1 plot RUN_DIR`: reward (total and per function), KL, completion-length and validation (`eval/*`) curves
from `metrics.jsonl`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vlmr1_jax.train.metrics import read_metrics

# One PNG per panel: (file stem, title, y label, metric names or a prefix ending in "/").
PANELS = (
    ("reward", "Reward", "reward", ("reward", "rewards/")),
    ("kl", "KL to the reference policy", "kl", ("kl",)),
    ("completion_length", "Completion length", "tokens", ("completion_length",)),
    ("eval", "Validation split, greedy decoding", "mean over the split", ("eval/reward", "eval/")),
)


def _panel_metrics(records: list[dict[str, Any]], wanted: tuple[str, ...]) -> list[str]:
    """Metric names present in `records` that a panel draws, in `wanted` order (prefixes expand, sorted)."""
    present = {name for record in records for name, value in record.items() if value is not None}
    names = []
    for item in wanted:
        if item.endswith("/"):
            names += sorted(n for n in present if n.startswith(item) and n not in names)
        elif item in present:
            names.append(item)
    return names


def _curve(records: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric; a step where it is null (non-finite) is drawn as a gap."""
    rows = [(r["step"], r[name]) for r in records if name in r]
    return [s for s, _ in rows], [float("nan") if v is None else v for _, v in rows]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw the panels that have data into `out` (default `run_dir/plots`); returns the PNG paths."""
    records = read_metrics(run_dir)
    out_dir = Path(out) if out is not None else Path(run_dir) / "plots"
    paths = []
    for stem, title, ylabel, wanted in PANELS:
        names = _panel_metrics(records, wanted)
        if not names:
            continue
        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for name in names:
            steps, values = _curve(records, name)
            ax.plot(
                steps,
                values,
                label=name,
                linewidth=2.0 if name == wanted[0] else 1.2,
                marker="." if len(steps) < 30 else None,
            )  # short runs: single points stay visible
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize="small")
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{stem}.png"
        fig.savefig(path)
        paths.append(path)
    if not paths:
        raise ValueError(
            f"{Path(run_dir) / 'metrics.jsonl'} has none of reward, rewards/<fn>, kl, completion_length, eval/*"
        )
    return paths
