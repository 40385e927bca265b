"""`vlmr1 plan`: the command line of train/plan.py (will a recipe fit N devices?)."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from vlmr1_jax.config import load_config
from vlmr1_jax.train import plan
from vlmr1_jax.train.plan import (
    DEFAULT_IMAGE_SIZE,
    DEVICE_HBM_GIB,
    EXIT_DOES_NOT_FIT,
    HEADROOM,
    cpu_devices,
    format_plan,
    make_plan,
    parse_image_size,
)


def _reexec(args: argparse.Namespace) -> int:
    """Run this plan in a fresh process whose JAX has `args.devices` CPU devices."""
    argv = [
        sys.executable,
        "-m",
        "vlmr1_jax.cli",
        "plan",
        args.config,
        *args.overrides,
        "--devices",
        str(args.devices),
        "--device-kind",
        args.device_kind,
        "--image-size",
        args.image_size,
        "--images",
        str(args.images),
        "--headroom",
        str(args.headroom),
    ]
    if args.hbm_gib is not None:
        argv += ["--hbm-gib", str(args.hbm_gib)]
    if args.json:
        argv += ["--json", args.json]
    return subprocess.run(argv).returncode


def run(args: argparse.Namespace) -> int:
    if args.devices < 1:
        raise SystemExit(f"vlmr1 plan: --devices must be >= 1, got {args.devices}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr, force=True)
    devices = cpu_devices(args.devices)
    if devices is None:
        return _reexec(args)
    try:
        cfg = load_config(args.config, args.overrides)
        plan = make_plan(
            cfg,
            devices,
            args.device_kind,
            recipe=args.config,
            hbm_gib=args.hbm_gib,
            image_size=parse_image_size(args.image_size),
            images=args.images,
            headroom=args.headroom,
        )
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise SystemExit(f"vlmr1 plan: {err}") from None
    print(format_plan(plan))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(plan.to_json(), indent=1))
    return 0 if plan.fits else EXIT_DOES_NOT_FIT


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="will a recipe fit N devices? (AOT compile on a simulated CPU mesh)",
        description=plan.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"exit status: 0 fits, {EXIT_DOES_NOT_FIT} does not fit",
    )
    p.add_argument("config", help="recipe: a YAML path or a packaged name (vlmr1_jax/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.preset=qwen2.5-vl-3b")
    p.add_argument(
        "--devices",
        type=int,
        required=True,
        help="JAX devices = chips (v5p-8: 4, v5p-64: 32, v5e-8 / v6e-8: 8, 8xH100: 8)",
    )
    p.add_argument(
        "--device-kind",
        required=True,
        choices=sorted(DEVICE_HBM_GIB),
        help="HBM per device: " + ", ".join(f"{k} {v:g} GiB" for k, v in DEVICE_HBM_GIB.items()),
    )
    p.add_argument("--hbm-gib", type=float, help="override the device's HBM (GiB)")
    p.add_argument("--headroom", type=float, default=HEADROOM, help="fits when peak <= this fraction of HBM")
    p.add_argument(
        "--image-size",
        default="x".join(map(str, DEFAULT_IMAGE_SIZE)),
        help="WIDTHxHEIGHT of each prompt's image(s) before smart_resize (default: %(default)s, a "
        "typical COCO / RefCOCO image)",
    )
    p.add_argument("--images", type=int, default=1, help="images per prompt (default 1, as REC)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=run)
