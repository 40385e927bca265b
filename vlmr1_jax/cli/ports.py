"""`vlmr1 infer` (run an exported release on one prompt) and `vlmr1 deploy ascend` (write vllm-ascend scripts)."""

from __future__ import annotations

import argparse
import sys

from vlmr1_jax.dtypes import DTYPES, dtype_arg

BACKENDS = ("torch", "jax")


def infer_jax(args: argparse.Namespace) -> str:
    """Greedy completion of one prompt with our JAX model loaded from the release folder (its own tokenizer and
    preprocessor bounds), built exactly as `TorchRuntime` builds it."""
    from pathlib import Path

    from vlmr1_jax.data.jsonl import Sample
    from vlmr1_jax.eval.rec import GreedyDecoder, pixel_bounds
    from vlmr1_jax.models.family import processor_of
    from vlmr1_jax.models.hf_weights import load_hf_model
    from vlmr1_jax.processing.tokenizer import Tokenizer
    from vlmr1_jax.train.setup import dtype_of

    if args.sample:
        raise ValueError("--backend jax decodes greedily; use --backend torch for --sample")
    folder = Path(args.model)
    dtype = dtype_of(args.dtype or "float32")
    model = load_hf_model(folder, dtype=dtype, param_dtype=dtype)
    min_pixels, max_pixels = pixel_bounds(folder, None, None, processor_of(model.cfg))
    # "{Question}" is the verbatim template: the prompt is used as given unless --task-type names one.
    decoder = GreedyDecoder(
        model,
        Tokenizer.load(folder),
        task_type=args.task_type or "{Question}",
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        batch_size=1,
        max_new_tokens=args.max_new_tokens,
    )
    sample = Sample(
        id=0,
        problem=args.prompt,
        solution="",
        image_paths=tuple(args.image),
        accu_reward_method="default",
        source="<prompt>",
        line=0,
    )
    completions, _ = decoder([sample])
    return completions[0]


def infer_torch(args: argparse.Namespace) -> str:
    from ports.torch_runtime import TorchRuntime

    runtime = TorchRuntime.load(args.model, device=args.device, dtype=args.dtype)
    return runtime.generate(
        args.image,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        greedy=not args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        task_type=args.task_type,
    )


def check_task_type(model_dir: str, task_type: str | None) -> None:
    """ValueError unless `task_type` names a question template of the release's model family (None: verbatim)."""
    from vlmr1_jax.models.family import processor_of
    from vlmr1_jax.models.hf_weights import read_config

    if task_type is None:
        return
    cfg = read_config(model_dir)
    templates = processor_of(cfg).question_templates
    if task_type not in templates:
        raise ValueError(
            f"--task-type {task_type!r}: the {cfg.family} family's question templates are {sorted(templates)}"
        )


def run_infer(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        print(f"error: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    try:
        check_task_type(args.model, args.task_type)
        text = infer_jax(args) if args.backend == "jax" else infer_torch(args)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0


def run_deploy_ascend(args: argparse.Namespace) -> int:
    from converters.check import check_export
    from ports.ascend.scripts import PLATFORMS, spec_for_release, write_scripts

    platform = PLATFORMS[args.target]
    if not args.skip_check:
        problems = check_export(args.model, platform.export_target)
        if problems:
            for problem in problems:
                print(f"PROBLEM: {problem}", file=sys.stderr)
            print(
                f"error: {args.model} is not a valid {platform.export_target} release; export it with "
                f"`vlmr1 export SOURCE --out DIR --target {platform.export_target}`",
                file=sys.stderr,
            )
            return 1
    try:
        spec = spec_for_release(
            args.model,
            args.target,
            image=args.image,
            served_model_name=args.served_model_name,
            max_model_len=args.max_model_len,
            port=args.port,
            devices=tuple(args.devices),
        )
        paths = write_scripts(spec, args.out, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {', '.join(p.name for p in paths)} to {args.out} for {platform.title} ({spec.image}, "
        f"--dtype {spec.dtype}); start the server with {args.out}/docker_run.sh"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "infer",
        help="generate from an exported release folder on one prompt",
        description="Generate with an exported release: VLM-R1's prompt (images first, then "
        "the text), greedy unless --sample.",
    )
    p.add_argument("--model", required=True, help="exported release folder")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--prompt", required=True, help="the question / instruction text")
    p.add_argument(
        "--task-type",
        help="wrap the prompt in this task's training question template, one of the model family's "
        "(Qwen: rec, ic, odLength, default); default: verbatim",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="torch: transformers (cpu/cuda/npu); jax: our model on the default JAX device (greedy)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda", "npu"),
        default="auto",
        help="auto: npu if torch_npu works, else cuda, else cpu",
    )
    p.add_argument(
        "--dtype",
        type=dtype_arg,
        choices=list(DTYPES),
        help="torch default: float32 on cpu, the release's torch_dtype on an accelerator; jax: float32 "
        "(bf16 / fp16 / fp32 also accepted)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_infer)

    d = subparsers.add_parser("deploy", help="write deployment scripts for an exported release")
    platforms = d.add_subparsers(dest="platform", required=True, metavar="PLATFORM")
    a = platforms.add_parser(
        "ascend",
        help="vllm-ascend docker scripts (Atlas 800T A2 bf16, 300I Duo fp16)",
        description="Check the release for the target, then write docker_run.sh, serve.sh, "
        "offline_inference.py and query.sh (see docs/deploy-ascend.md).",
    )
    a.add_argument("--model", required=True, help="exported release folder (vlmr1 export --target ascend-...)")
    a.add_argument("--target", choices=("a2", "310p"), required=True)
    a.add_argument("--out", required=True, help="folder for the scripts")
    a.add_argument("--image", help="docker image (default: the pinned one for the target)")
    a.add_argument("--served-model-name", help="default: the release folder's name")
    a.add_argument("--max-model-len", type=int, default=16384)
    a.add_argument("--port", type=int, default=8000)
    a.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=[0],
        help="NPU indices (/dev/davinciN); tensor parallel size = their count",
    )
    a.add_argument("--skip-check", action="store_true", help="do not run check-export on --model first")
    a.add_argument("--overwrite", action="store_true", help="replace existing scripts in --out")
    a.set_defaults(func=run_deploy_ascend)
