"""`vlmr1 ...` run in the test process through the real command-line parser."""

from __future__ import annotations

import re

from vlmr1_jax.cli import build_parser

# One problem line of `vlmr1 data check`: file, line, field and kind.
PROBLEM_LINE = re.compile(r"^\s+(\S+):(\d+): field '([^']*)': .* \[(\w+)\]$")


def run_cli(*argv: object) -> int:
    """Exit code of `vlmr1 <argv>` (arguments str()-ed). Calls the sub-command directly, not `main`, so an
    unexpected exception fails the test with its traceback instead of becoming exit code 2."""
    args = build_parser().parse_args([str(a) for a in argv])
    return args.func(args)
