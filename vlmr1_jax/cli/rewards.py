"""`vlmr1 reward NAME --completion TEXT --solution TEXT [--column KEY=JSON ...] [--option KEY=JSON ...]`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vlmr1_jax.rewards.registry import REWARDS, get_reward


def _key_values(pairs: list[str], flag: str) -> dict[str, Any]:
    """`KEY=VALUE` pairs; VALUE is parsed as JSON, or kept as a plain string when it is not JSON."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    """Score one completion and print the reward; exit code 2 on bad arguments or data."""
    try:
        columns = {key: [value] for key, value in _key_values(args.column, "--column").items()}
        if args.solution is not None:
            columns["solution"] = [args.solution]
        reward = get_reward(args.name, **_key_values(args.option, "--option"))
        score = reward([args.completion], **columns)[0]
    except ValueError as err:
        print(f"vlmr1 reward: {err}", file=sys.stderr)
        return 2
    print(score)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `reward` sub-command."""
    parser = subparsers.add_parser(
        "reward",
        help="score one completion with a reward function",
        description="Score one completion. The solution is passed as the reward sees it, i.e. as the data loader "
        "writes it: '<answer> ... </answer>'.",
    )
    parser.add_argument("name", help=f"{', '.join(sorted(REWARDS))}, or a user function 'package.module:function'")
    parser.add_argument("--completion", required=True, help="the decoded model output")
    parser.add_argument("--solution", help="the ground truth, e.g. '<answer> [10, 20, 50, 60] </answer>'")
    parser.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="another per-sample column, e.g. accu_reward_method=mcq or model_image_size=[[504,700]]",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a reward option, e.g. vlmr1_compat=true or rescale=false",
    )
    parser.set_defaults(func=run)
