"""`vlmr1 check-parity`: the command line of ports/parity.py (our JAX port against transformers on an HF folder of
any model family)."""

from __future__ import annotations

import argparse
import math

import jax.numpy as jnp

from ports import parity
from ports.parity import ATOL, RTOL, compare, make_inputs
from vlmr1_jax.dtypes import dtype_arg
from vlmr1_jax.models.family import processor_of
from vlmr1_jax.models.hf_weights import read_config
from vlmr1_jax.models.processor import max_pixels_or_default


def _count(minimum: int):
    """argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _tolerance(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _image_sizes(text: str) -> list[tuple[int, int]]:
    """argparse type: comma-separated HxW pixel sizes, both positive (the family's processor checks the rest)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        h, sep, w = part.lower().partition("x")
        try:
            size = (int(h), int(w))
        except ValueError:
            size = None
        if not sep or size is None or min(size) < 1:
            raise argparse.ArgumentTypeError(f"{part!r} is not HxW with positive integers, e.g. 336x448")
        out.append(size)
    return out


def run_cli(args: argparse.Namespace) -> int:
    cfg = read_config(args.hf_model)
    processor = processor_of(cfg)
    args.max_pixels = max_pixels_or_default(args.max_pixels, processor)
    sizes = args.image_sizes or [(112, 168), (84, 140)]
    sizes = [sizes[i % len(sizes)] for i in range(args.images)]
    grids = []
    for h, w in sizes:
        try:
            grids.append(processor.image_grid(h, w, min_pixels=args.min_pixels, max_pixels=args.max_pixels))
        except ValueError as e:
            raise ValueError(f"--image-sizes {h}x{w}: {e}") from None
    inputs = make_inputs(
        args.hf_model,
        sizes,
        batch=args.batch,
        steps=args.steps,
        seed=args.seed,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )
    report = compare(args.hf_model, inputs, jnp.dtype(args.dtype))
    ok = report.passed(args.rtol, args.atol)
    print(
        f"{cfg.family}: image sizes {sizes} -> grids {grids}; batch {args.batch}; prompt length "
        f"{inputs.batch.input_ids.shape[1]}; ours in {args.dtype}, transformers in float32"
    )
    print(f"rule: max|diff| <= atol + rtol * max|ref| with rtol {args.rtol:g}, atol {args.atol:g}")
    for d in report.diffs:
        print(d.line(args.rtol, args.atol))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check-parity",
        help="compare our JAX model with transformers on an HF folder",
        description=parity.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--hf-model", required=True, help="HF model folder (config.json, safetensors and tokenizer) of any family"
    )
    p.add_argument("--images", type=_count(0), default=2, help="number of images in the batch (0: text only)")
    p.add_argument(
        "--image-sizes",
        type=_image_sizes,
        default=[],
        help="comma-separated HxW pixel sizes, cycled over the images (default 112x168,84x140)",
    )
    p.add_argument("--batch", type=_count(1), default=2, help="batch rows (shorter rows are left-padded)")
    p.add_argument("--steps", type=_count(0), default=4, help="cached decode steps to compare")
    p.add_argument("--min-pixels", type=_count(1), default=3136)
    p.add_argument("--max-pixels", type=_count(1), help="default: the model family's own")
    p.add_argument(
        "--dtype",
        type=dtype_arg,
        choices=["float32", "bfloat16"],
        default="float32",
        help="our compute dtype (fp32 / bf16 also accepted; bfloat16 differs at ~1e-2 relative: raise "
        "--rtol to compare it)",
    )
    p.add_argument(
        "--rtol",
        type=_tolerance,
        default=RTOL,
        help=f"relative tolerance: pass when max|diff| <= atol + rtol * max|ref| (default {RTOL:g})",
    )
    p.add_argument("--atol", type=_tolerance, default=ATOL, help=f"absolute tolerance (default {ATOL:g})")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_cli)
