"""`vlmr1 eval rec`: VLM-R1's REC evaluation (docs/facts.md) of an exported model or one of our checkpoints.

Protocol of `test_rec_r1.py`: `random.seed(42); random.shuffle(data); data[:2000]`, the "rec" question template,
greedy decoding of at most 256 new tokens, the first `<answer>` and its braced box, the rescale from the resized
frame to the original image, correct iff the +-1 IoU is strictly above 0.5. The JAX backend runs our model (an HF
folder or a checkpoint); the torch backend runs the HF folder in transformers (cpu / cuda / npu), with the same
prompts and image processing, batched with left padding.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from vlmr1_jax.data.jsonl import DataError, Sample
from vlmr1_jax.dtypes import dtype_arg
from vlmr1_jax.eval.rec import Frames, image_frames, load_eval_samples, pixel_bounds, score_rec

BACKENDS = ("jax", "torch")


def complete_jax(
    model_path: Path, samples: Sequence[Sample], args: argparse.Namespace
) -> tuple[list[str], list[Frames]]:
    """Completions and each image's box frame from our model: an HF folder or a vlmr1-jax checkpoint."""
    from vlmr1_jax.eval.rec import GreedyDecoder
    from vlmr1_jax.processing.tokenizer import Tokenizer, qwen2_5_tokenizer

    if (model_path / "config.json").is_file():
        from vlmr1_jax.models.hf_weights import load_hf_model
        from vlmr1_jax.train.setup import dtype_of

        dtype = dtype_of(args.dtype or "float32")
        model = load_hf_model(model_path, dtype=dtype, param_dtype=dtype)
        tokenizer = Tokenizer.load(model_path)
    else:
        from vlmr1_jax.train.restore import load_checkpoint

        model, _, tokenizer_dir = load_checkpoint(model_path, args.step)
        tokenizer = Tokenizer.load(tokenizer_dir) if tokenizer_dir else qwen2_5_tokenizer()
    min_pixels, max_pixels = pixel_bounds(model_path, args.min_pixels, args.max_pixels)
    decoder = GreedyDecoder(
        model,
        tokenizer,
        task_type=args.task_type,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    return decoder(samples)


def complete_torch(
    model_path: Path, samples: Sequence[Sample], args: argparse.Namespace
) -> tuple[list[str], list[Frames]]:
    """Completions and each image's box frame from transformers on an exported HF folder."""
    from ports.torch_runtime import TorchRuntime

    if not (model_path / "config.json").is_file():
        raise ValueError(
            f"{model_path}: --backend torch needs an HF folder; export the checkpoint first "
            f"(vlmr1 export {model_path} --out DIR)"
        )
    runtime = TorchRuntime.load(model_path, device=args.device, dtype=args.dtype)
    runtime.min_pixels, runtime.max_pixels = pixel_bounds(model_path, args.min_pixels, args.max_pixels)
    completions: list[str] = []
    grids: list[list[list[int]]] = []
    for start in range(0, len(samples), args.batch_size):
        chunk = samples[start : start + args.batch_size]
        batch = runtime.batch_inputs([(s.image_paths, s.problem) for s in chunk], task_type=args.task_type)
        rows = runtime.generate_from(batch, max_new_tokens=args.max_new_tokens)
        completions += [runtime.tokenizer.decode(ids, skip_special_tokens=True) for ids in rows]
        flat = iter(batch["image_grid_thw"].tolist())
        grids += [[next(flat) for _ in s.image_paths] for s in chunk]
    return completions, image_frames(runtime.cfg, grids)


def run_rec(args: argparse.Namespace) -> int:
    from vlmr1_jax.train.checkpoint import CheckpointError

    if args.batch_size < 1 or args.max_new_tokens < 1:
        print("error: --batch-size and --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    model_path = Path(args.model)
    try:
        samples = load_eval_samples(args.data, args.image_root, args.limit, args.seed)
        complete = complete_jax if args.backend == "jax" else complete_torch
        completions, frames = complete(model_path, samples, args)
        summary, records = score_rec(samples, completions, frames)
    except (DataError, CheckpointError, OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out or f"rec_results_{Path(args.data).stem}_{args.backend}.json")
    report = {
        "task": "rec",
        "model": str(model_path),
        "data": args.data,
        "backend": args.backend,
        "limit": args.limit,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        **summary,
        "results": records,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    correct = sum(r["correct"] for r in records)
    print(
        f"accuracy: {summary['accuracy']:.2f}% ({correct}/{summary['n']}); mean IoU reward {summary['iou']:.4f}, "
        f"format {summary['format']:.4f}; per-sample results in {out}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on a benchmark protocol (rec)")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    r = tasks.add_parser(
        "rec",
        help="REC Acc@0.5 with VLM-R1's protocol",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument(
        "--model",
        required=True,
        help="exported HF folder; with --backend jax also a vlmr1-jax checkpoint (run / step folder)",
    )
    r.add_argument("--data", required=True, help="VLM-R1 jsonl file")
    r.add_argument("--image-root", required=True, help="folder the jsonl image paths are relative to")
    r.add_argument("--backend", choices=BACKENDS, default="jax")
    r.add_argument("--limit", type=int, default=2000, help="samples after the seeded shuffle (0 = all)")
    r.add_argument("--seed", type=int, default=42, help="shuffle seed (VLM-R1: 42)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument(
        "--task-type",
        default="rec",
        help="question template: rec (default), another task type, or a custom '{Question}' string",
    )
    r.add_argument("--min-pixels", type=int, help="default: the release's preprocessor_config.json, else 3136")
    r.add_argument("--max-pixels", type=int, help="default: the release's preprocessor_config.json, else 12845056")
    r.add_argument(
        "--dtype",
        type=dtype_arg,
        choices=("float32", "bfloat16", "float16"),
        help="jax on an HF folder: default float32; torch: float32 on cpu, else the release's "
        "(fp32 / bf16 / fp16 also accepted)",
    )
    r.add_argument("--device", choices=("auto", "cpu", "cuda", "npu"), default="auto", help="torch backend only")
    r.add_argument("--step", type=int, help="checkpoint step (jax backend; default: the latest)")
    r.add_argument("--out", help="per-sample results JSON (default: rec_results_<data>_<backend>.json)")
    r.set_defaults(func=run_rec)
