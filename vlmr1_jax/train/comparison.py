"""SFT vs GRPO over seeds: the figure (in domain | out of domain; Acc@0.5 and mean IoU against step, mean line and
min-max band over seeds) and the markdown table of `vlmr1 experiment sft-vs-rl`'s per-step rows.

A row is one evaluation: {"method", "seed", "step", "split", "protocol", "accuracy" (a fraction), "mean_iou", ...}.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METHODS = {"sft": "SFT", "grpo": "GRPO"}
COLOURS = {"sft": "tab:blue", "grpo": "tab:orange"}
METRICS = {"accuracy": ("Acc@0.5 (%)", 100.0), "mean_iou": ("mean IoU", 1.0)}  # name -> (label, scale)

Curve = dict[int, list[float]]  # step -> the value of each seed


def curves(rows: Sequence[Mapping[str, Any]], split: str, metric: str, protocol: str) -> dict[str, Curve]:
    """Per method, step -> the metric's value for each seed, from the rows of one split and protocol."""
    out: dict[str, Curve] = {m: defaultdict(list) for m in METHODS}
    for row in rows:
        if row["split"] == split and row["protocol"] == protocol and row["method"] in out:
            out[row["method"]][int(row["step"])].append(float(row[metric]))
    return {m: dict(sorted(c.items())) for m, c in out.items() if c}


def draw_comparison(
    rows: Sequence[Mapping[str, Any]], splits: Mapping[str, str], protocol: str, out: str | Path
) -> Path:
    """Save the figure: one column per split ({split: title}), one row per metric; returns the PNG path."""
    fig = Figure(figsize=(5.2 * len(splits), 3.4 * len(METRICS)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(METRICS), len(splits), squeeze=False)
    seeds = len({row["seed"] for row in rows})
    for col, (split, title) in enumerate(splits.items()):
        for row_index, (metric, (label, scale)) in enumerate(METRICS.items()):
            ax = axes[row_index][col]
            for method, curve in curves(rows, split, metric, protocol).items():
                steps = list(curve)
                values = [np.asarray(curve[s]) * scale for s in steps]
                ax.plot(steps, [v.mean() for v in values], color=COLOURS[method], label=METHODS[method], marker=".")
                ax.fill_between(
                    steps, [v.min() for v in values], [v.max() for v in values], color=COLOURS[method], alpha=0.2
                )
            ax.set(title=title if row_index == 0 else "", xlabel="step after the warm start", ylabel=label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    fig.suptitle(f"SFT vs GRPO from one warm start: mean and min-max over {seeds} seed(s)", fontsize=10)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _spread(values: Sequence[float], scale: float) -> str:
    """Mean, and (min-max) when there is more than one value."""
    v = np.asarray(values, dtype=float) * scale
    f = "{:.1f}" if scale > 1 else "{:.3f}"
    if not len(v):
        return "-"
    return f.format(v.mean()) if len(v) == 1 else f"{f.format(v.mean())} ({f.format(v.min())}-{f.format(v.max())})"


def _select(rows: Sequence[Mapping[str, Any]], protocol: str, **match: Any) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["protocol"] == protocol and all(r[k] == v for k, v in match.items())]


def comparison_table(rows: Sequence[Mapping[str, Any]], splits: Mapping[str, str], protocol: str) -> str:
    """Markdown: the warm start and each method's last evaluation, mean (min-max) over seeds; then every seed."""
    columns = [(split, metric) for split in splits for metric in METRICS]
    header = [f"{splits[s]} {METRICS[m][0]}" for s, m in columns]
    methods = [m for m in METHODS if _select(rows, protocol, method=m)]
    if not methods:
        raise ValueError(f"no rows of the methods {list(METHODS)} with protocol {protocol!r}")

    def cells(**match: Any) -> str:
        picked = [_spread([r[m] for r in _select(rows, protocol, split=s, **match)], METRICS[m][1]) for s, m in columns]
        return " | ".join(picked)

    start = min(r["step"] for r in _select(rows, protocol))
    any_seed = min(r["seed"] for r in _select(rows, protocol, method=methods[0], step=start))
    last = {m: max(r["step"] for r in _select(rows, protocol, method=m)) for m in methods}
    lines = ["| | step | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
    lines.append(f"| warm start | {start} | {cells(method=methods[0], step=start, seed=any_seed)} |")
    lines += [f"| {METHODS[m]} | {last[m]} | {cells(method=m, step=last[m])} |" for m in methods]
    lines += ["", "| method | seed | step | " + " | ".join(header) + " |", "|---|---|---|" + "---|" * len(header)]
    for m in methods:
        for seed in sorted({r["seed"] for r in _select(rows, protocol, method=m)}):
            lines.append(f"| {METHODS[m]} | {seed} | {last[m]} | {cells(method=m, step=last[m], seed=seed)} |")
    return "\n".join(lines) + "\n"
