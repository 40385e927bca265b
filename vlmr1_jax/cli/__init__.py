"""`vlmr1` command line: one module per command group (each exposes `register(subparsers)`, which adds its
sub-command(s) and sets `func`). The library code the commands drive stays in its own package; this package is
the one place that imports across the others (docs/architecture.md)."""

from __future__ import annotations

import argparse
import contextlib
import sys

from vlmr1_jax.cli import data, demo, evaluate, experiment, export, parity, plan, plot, ports, rewards, train
from vlmr1_jax.cli.compile_cache import DEFAULT_DIR, ENV_VAR, enable_compilation_cache
from vlmr1_jax.extras import MissingExtraError
from vlmr1_jax.quiet import quiet_libraries, without_background_tracebacks

COMMAND_MODULES = (parity, data, rewards, plot, train, demo, experiment, plan, evaluate, export, ports)


# Errors that mean "the user's input or machine is wrong" (config values, paths, data, disk, a missing extra): one
# line, no traceback.
USER_ERRORS = (ValueError, KeyError, OSError, MissingExtraError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmr1", description="GRPO for vision-language models in JAX")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show full tracebacks and library INFO logs (absl / orbax) instead of one error line",
    )
    parser.add_argument(
        "--compilation-cache",
        metavar="DIR",
        help=f"JAX's persistent compilation cache (default: ${ENV_VAR}, else {DEFAULT_DIR}); `off` disables it",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        quiet_libraries()
    enable_compilation_cache(args.compilation_cache)
    try:
        with contextlib.nullcontext() if args.debug else without_background_tracebacks():
            return int(args.func(args) or 0)
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        print("(run `vlmr1 --debug ...` for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
