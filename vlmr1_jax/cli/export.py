"""`vlmr1 export` (a release folder for hf / ascend-a2 / ascend-310p) and `vlmr1 check-export` (validate one)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from converters.check import check_export, nonfinite_problems
from converters.export import ADAPTER_DIR, export_source
from converters.import_hf import import_hf
from converters.release import ExportError
from converters.targets import TARGETS
from vlmr1_jax.dtypes import DTYPES, dtype_arg
from vlmr1_jax.train.checkpoint import CheckpointError


def _load_card(path: str | None) -> dict:
    if path is None:
        return {}
    try:
        card = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--card {path}: cannot read JSON ({e})") from e
    if not isinstance(card, dict):
        raise ValueError(f"--card {path}: expected a JSON object")
    return card


def run_export(args: argparse.Namespace) -> int:
    try:
        out = export_source(
            Path(args.source),
            args.out,
            lora=args.lora,
            step=args.step,
            target=args.target,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            tokenizer_dir=args.tokenizer_dir,
            card=_load_card(args.card),
            overwrite=args.overwrite,
        )
    except (ExportError, CheckpointError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    adapter = f"; PEFT adapter in {out / ADAPTER_DIR}" if args.lora == "adapter" else ""
    print(f"wrote {out} (target {args.target}){adapter}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    try:
        out = import_hf(args.model, args.out, param_dtype=args.param_dtype)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote checkpoint {out} (step 0, kind import)")
    return 0


def run_check(args: argparse.Namespace) -> int:
    problems = check_export(args.dir, args.target)
    if not problems:  # the weights' values, one tensor at a time (the headers are known good now)
        problems = nonfinite_problems(args.dir)
    if args.forward:
        from ports.forward_report import forward_report  # the only part of check-export that needs torch

        report = forward_report(args.dir, dtype=args.forward_dtype, image=args.image, max_pixels=args.max_pixels)
        print(f"{report.dtype} forward, largest |activation| per layer (float16 limit 65504):")
        print("\n".join("  " + line for line in report.lines()))
        problems += report.problems()
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(f"{args.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'} for target {args.target}")
    return 1 if problems else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    targets = sorted(TARGETS)
    p = subparsers.add_parser(
        "export",
        help="write a complete HF release folder (hf, ascend-a2, ascend-310p)",
        description="Write a complete HF Qwen2.5-VL release folder: sharded safetensors, "
        "config, generation config, processor, tokenizer, chat template, card.",
    )
    p.add_argument(
        "source",
        help="an HF Qwen2.5-VL folder (re-export, e.g. bf16 -> fp16 for 310P), or a vlmr1-jax "
        "checkpoint: a run folder, its checkpoints/ folder or one step folder",
    )
    p.add_argument("--out", required=True, help="release folder to create")
    p.add_argument(
        "--target", choices=targets, default="hf", help="hf / ascend-a2: bfloat16 by default; ascend-310p: float16 only"
    )
    p.add_argument(
        "--dtype",
        type=dtype_arg,
        choices=list(DTYPES),
        help="weights dtype (bf16 / fp16 / fp32 also accepted; default: the target's)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--tokenizer-dir", help="tokenizer files to ship (default: SOURCE's, else the vendored Qwen2.5)")
    p.add_argument(
        "--card", help="JSON object for README.md: name, base_model, license, datasets, rewards, steps, metrics, ..."
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (atomically)")
    p.add_argument("--step", type=int, help="checkpoint step to export (default: the latest)")
    p.add_argument(
        "--lora",
        choices=("merge", "adapter"),
        help="LoRA checkpoints: merge (default) folds the adapters into the weights; adapter writes the "
        f"base weights as the release and the PEFT adapter to OUT/{ADAPTER_DIR}",
    )
    p.set_defaults(func=run_export)

    i = subparsers.add_parser(
        "import-hf",
        help="turn an HF Qwen2.5-VL folder into a vlmr1-jax checkpoint",
        description="Write an HF Qwen2.5-VL folder as a checkpoint of ours "
        "(OUT/checkpoints/0, kind 'import': the parameters only, streamed "
        "tensor by tensor with checksums; the optimizer state is created when "
        "training starts); the tokenizer stays in --model.",
    )
    i.add_argument("--model", required=True, help="HF Qwen2.5-VL folder")
    i.add_argument("--out", required=True, help="run folder to create (must not exist or be empty)")
    i.add_argument(
        "--param-dtype",
        type=dtype_arg,
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the stored parameters (fp32 / bf16 also accepted; default float32)",
    )
    i.set_defaults(func=run_import)

    c = subparsers.add_parser(
        "check-export",
        help="validate an exported release folder for a target",
        description="Validate a release folder without torch; --forward adds a "
        "transformers CPU forward that looks for inf/NaN and fp16 overflow.",
    )
    c.add_argument("dir", help="release folder")
    c.add_argument("--target", choices=targets, required=True)
    c.add_argument(
        "--forward",
        action="store_true",
        help="also run transformers on CPU in the release dtype and report activations per layer",
    )
    c.add_argument(
        "--forward-dtype",
        type=dtype_arg,
        choices=list(DTYPES),
        help="dtype of that forward (bf16 / fp16 / fp32 also accepted; default: config.json torch_dtype)",
    )
    c.add_argument("--image", help="image for the forward (default: a synthetic one; real images find more)")
    c.add_argument(
        "--max-pixels",
        type=int,
        default=448 * 448,
        help="resize bound for that image (default 448*448); fp16 overflow grows with the number of "
        "visual tokens, so try the resolution you will serve",
    )
    c.set_defaults(func=run_check)
