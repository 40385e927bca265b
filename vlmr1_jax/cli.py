"""`vlmr1` command line: one sub-command per job; each lives next to the code it drives and registers itself."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes `register(subparsers)`; it adds its sub-command(s) and sets `func` on the parser.
COMMAND_MODULES = (
    "ports.parity",
    "vlmr1_jax.data.cli",
    "vlmr1_jax.rewards.cli",
    "vlmr1_jax.train.plot",
    "vlmr1_jax.train.cli",
    "vlmr1_jax.train.demo",
    "vlmr1_jax.train.plan",
    "vlmr1_jax.eval.cli",
    "converters.cli",
    "ports.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmr1", description="GRPO for vision-language models in JAX")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
