"""`vlmr1 plot RUN_DIR`: the command line of train/plot.py (a run's reward, KL and completion-length curves)."""

from __future__ import annotations

import argparse
import sys

from vlmr1_jax.train.plot import plot_run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vlmr1 plot RUN_DIR [--out DIR]` to the command line."""
    parser = subparsers.add_parser("plot", help="draw reward, KL and completion-length curves of a run")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="training output folder holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="folder for the PNGs (default RUN_DIR/plots)")
    parser.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"vlmr1 plot: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0
