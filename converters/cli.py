"""`vlmr1 export` (a release folder for hf / ascend-a2 / ascend-310p) and `vlmr1 check-export` (validate one)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from converters.check import DTYPES, TARGETS, check_export


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


def export_source(source: Path, out: str, **options) -> Path:
    """Export SOURCE: an HF folder (re-export / dtype conversion). A training checkpoint restores to
    (state, cfg) and goes through `converters.release.export_release(state, cfg, out, **options)`."""
    from converters.release import export_hf_folder

    if (source / "config.json").is_file():
        return export_hf_folder(source, out, **options)
    raise ValueError(f"{source}: not an HF Qwen2.5-VL folder (no config.json)")


def run_export(args: argparse.Namespace) -> int:
    from converters.release import ExportError

    try:
        out = export_source(Path(args.source), args.out, target=args.target, dtype=args.dtype,
                            max_shard_size=args.max_shard_size, tokenizer_dir=args.tokenizer_dir,
                            card=_load_card(args.card), overwrite=args.overwrite)
    except (ExportError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (target {args.target})")
    return 0


def run_check(args: argparse.Namespace) -> int:
    problems = check_export(args.dir, args.target)
    if args.forward:
        from converters.check import forward_report

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
    p = subparsers.add_parser("export", help="write a complete HF release folder (hf, ascend-a2, ascend-310p)",
                              description="Write a complete HF Qwen2.5-VL release folder: sharded safetensors, "
                                          "config, generation config, processor, tokenizer, chat template, card.")
    p.add_argument("source", help="an HF Qwen2.5-VL folder (re-export, e.g. bf16 -> fp16 for 310P)")
    p.add_argument("--out", required=True, help="release folder to create")
    p.add_argument("--target", choices=targets, default="hf",
                   help="hf / ascend-a2: bf16 by default; ascend-310p: fp16 only")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: the target's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--tokenizer-dir", help="tokenizer files to ship (default: SOURCE's, else the vendored Qwen2.5)")
    p.add_argument("--card", help="JSON object for README.md: name, base_model, license, datasets, rewards, "
                                  "steps, metrics, ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder (atomically)")
    p.set_defaults(func=run_export)

    c = subparsers.add_parser("check-export", help="validate an exported release folder for a target",
                              description="Validate a release folder without torch; --forward adds a "
                                          "transformers CPU forward that looks for inf/NaN and fp16 overflow.")
    c.add_argument("dir", help="release folder")
    c.add_argument("--target", choices=targets, required=True)
    c.add_argument("--forward", action="store_true",
                   help="also run transformers on CPU in the release dtype and report activations per layer")
    c.add_argument("--forward-dtype", choices=[d.torch_name for d in DTYPES.values()],
                   help="dtype of that forward (default: config.json torch_dtype)")
    c.add_argument("--image", help="image for the forward (default: a synthetic one; real images find more)")
    c.add_argument("--max-pixels", type=int, default=448 * 448,
                   help="resize bound for that image (default 448*448); fp16 overflow grows with the number of "
                        "visual tokens, so try the resolution you will serve")
    c.set_defaults(func=run_check)
