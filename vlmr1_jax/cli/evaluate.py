"""`vlmr1 eval rec|ovd|math`: VLM-R1's evaluations (docs/evaluation.md) of an exported model or one of our checkpoints.

- `rec`: Acc@0.5 with `--protocol r1` (`test_rec_r1.py`: the "rec" template, the first `<answer>` and its braced
  integer box) or `baseline` (`test_rec_baseline.py`: its own template, the first `[a, b, c, d]` anywhere, floats and
  negatives allowed); both rescale from the resized frame to the original image and count IoU > 0.5.
- `ovd`: dataset-level COCO mAP@[.5:.95] / AP50 (pycocotools, every box scored 1.0) and OVDEval's NMS-AP.
- `math`: accuracy as VLM-R1's accuracy reward scores it (math_verify for free-form, choice letters for mcq).

Each `--data` file (VLM-R1's `{ds}.json` list of image / problem / solution, or our jsonl) is subsampled as VLM-R1
does (`random.seed(42); random.shuffle(data); data[:N]`), decoded greedily in batches (JAX: our model, an HF folder
or a checkpoint; torch: transformers on an HF folder) and scored batch by batch into `--out`, so a re-run of the
same command resumes where a crash stopped. `--out` gets per-dataset JSON records and one markdown table.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vlmr1_jax.config import MeshConfig
from vlmr1_jax.data.jsonl import DataError, Sample
from vlmr1_jax.dtypes import dtype_arg
from vlmr1_jax.eval.data import dataset_name, file_digest, load_eval_samples
from vlmr1_jax.eval.math import math_records, summarize_math
from vlmr1_jax.eval.ovd import ovd_records, summarize_ovd
from vlmr1_jax.eval.protocols import family_protocol, get_protocol, protocol_names
from vlmr1_jax.eval.rec import Frames, image_frames, pixel_bounds, rec_records, summarize_rec
from vlmr1_jax.eval.runner import Decoder, Scorer, score_dataset
from vlmr1_jax.eval.store import RecordStore, open_output, write_json_atomic
from vlmr1_jax.eval.tables import results_table
from vlmr1_jax.models.family import ModelFamily, config_from_dict, family_of, processor_of

BACKENDS = ("jax", "torch")
# Per task: the question template, new-token budget and subset size when not given on the command line.
DEFAULTS: dict[str, dict[str, Any]] = {
    "ovd": {"task_type": "odLength", "max_new_tokens": 1024, "limit": 0},  # VLM-R1's OVD run (ovd_3b recipe)
    "math": {"task_type": "default", "max_new_tokens": 1024, "limit": 0},
}


def mesh_arg(text: str) -> MeshConfig:
    """`--mesh DATA,FSDP,TENSOR` (e.g. `-1,1,1`, `1,-1,1`, `2,2,2`)."""
    try:
        data, fsdp, tensor = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give three integers DATA,FSDP,TENSOR, e.g. -1,1,1") from None
    return MeshConfig(data=data, fsdp=fsdp, tensor=tensor)


def jax_decoder(model_path: Path, args: argparse.Namespace, task_type: str, max_new_tokens: int) -> Decoder:
    """Greedy decoding with our model: an HF folder or a vlmr1-jax checkpoint."""
    from vlmr1_jax.eval.rec import GreedyDecoder
    from vlmr1_jax.parallel.mesh import make_mesh
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
    min_pixels, max_pixels = pixel_bounds(model_path, args.min_pixels, args.max_pixels, processor_of(model.cfg))
    return GreedyDecoder(
        model,
        tokenizer,
        task_type=task_type,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        batch_size=args.batch_size,
        max_new_tokens=max_new_tokens,
        mesh=make_mesh(args.mesh),
    )


def torch_decoder(model_path: Path, args: argparse.Namespace, task_type: str, max_new_tokens: int) -> Decoder:
    """Greedy decoding with transformers on an exported HF folder (left-padded batches, our prompts and pixels)."""
    from ports.torch_runtime import TorchRuntime

    if not (model_path / "config.json").is_file():
        raise ValueError(
            f"{model_path}: --backend torch needs an HF folder; export the checkpoint first "
            f"(vlmr1 export {model_path} --out DIR)"
        )
    runtime = TorchRuntime.load(model_path, device=args.device, dtype=args.dtype)
    runtime.min_pixels, runtime.max_pixels = pixel_bounds(
        model_path, args.min_pixels, args.max_pixels, runtime.processor
    )

    def decode(samples: Sequence[Sample]) -> tuple[list[str], list[Frames]]:
        batch = runtime.batch_inputs([(s.image_paths, s.problem) for s in samples], task_type=task_type)
        rows = runtime.generate_from(batch, max_new_tokens=max_new_tokens)
        flat = iter(batch["image_grid_thw"].tolist() if "image_grid_thw" in batch else [])
        grids = [[next(flat) for _ in s.image_paths] for s in samples]
        return [runtime.tokenizer.decode(ids, skip_special_tokens=True) for ids in rows], image_frames(
            runtime.cfg, grids
        )

    return decode


def model_family(model_path: Path, step: int | None) -> ModelFamily:
    """The family of an HF folder (its config.json) or of one of our checkpoints (its meta)."""
    from vlmr1_jax.models.hf_weights import read_config
    from vlmr1_jax.train.restore import checkpoint_meta

    if (model_path / "config.json").is_file():
        return family_of(read_config(model_path))
    return family_of(config_from_dict(checkpoint_meta(model_path, step)["model_config"]))


def task_parts(
    args: argparse.Namespace, model_path: Path
) -> tuple[dict[str, Any], Scorer, Callable[[list[dict]], dict[str, Any]]]:
    """The task's settings (template, budget, protocol: --protocol, else the model family's), its batch scorer and
    its dataset summary."""
    settings: dict[str, Any]
    if args.task == "rec":
        protocol = (
            get_protocol(args.protocol) if args.protocol else family_protocol(model_family(model_path, args.step))
        )
        settings = {
            "protocol": protocol.name,
            "task_type": protocol.task_type,
            "rescale": protocol.rescale,
            "max_new_tokens": args.max_new_tokens or protocol.max_new_tokens,
        }
        return settings, functools.partial(rec_records, protocol=protocol), summarize_rec
    defaults = DEFAULTS[args.task]
    settings = {
        "task_type": args.task_type or defaults["task_type"],  # ovd and math have --task-type
        "max_new_tokens": args.max_new_tokens or defaults["max_new_tokens"],
    }
    if args.task == "ovd":
        return settings, ovd_records, summarize_ovd
    settings["reward_method"] = args.reward_method  # math only
    return settings, lambda samples, completions, _frames: math_records(samples, completions), summarize_math


def default_out(args: argparse.Namespace, settings: dict[str, Any]) -> Path:
    suffix = f"-{Path(settings['protocol']).name.replace(':', '-')}" if args.task == "rec" else ""
    return Path("runs/eval") / f"{args.task}-{Path(args.model).resolve().name}{suffix}"


def run_eval(args: argparse.Namespace) -> int:
    from vlmr1_jax.train.checkpoint import CheckpointError

    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1) or (args.limit or 0) < 0:
        print("error: --batch-size and --max-new-tokens must be >= 1 and --limit >= 0", file=sys.stderr)
        return 2
    roots = args.image_root or [None]
    if len(roots) not in (1, len(args.data)):
        message = f"{len(args.data)} --data files but {len(roots)} --image-root folders; give one, or one each"
        print(f"error: {message}", file=sys.stderr)
        return 2
    pairs = list(zip(args.data, roots * len(args.data) if len(roots) == 1 else roots))
    names = [dataset_name(data) for data, _ in pairs]
    if len(set(names)) != len(names):
        print(f"error: --data files must have different names (the tables' rows), got {names}", file=sys.stderr)
        return 2
    model_path = Path(args.model)
    limit = DEFAULTS.get(args.task, {}).get("limit", 2000) if args.limit is None else args.limit
    try:
        settings, scorer, summarize = task_parts(args, model_path)
        settings = {
            "task": args.task,
            "model": str(model_path.resolve()),
            "step": args.step,
            "backend": args.backend,
            "dtype": args.dtype,
            "min_pixels": args.min_pixels,
            "max_pixels": args.max_pixels,
            "limit": limit,
            "seed": args.seed,
            **settings,
        }
        datasets: dict[str, dict[str, str]] = {}
        subsets: dict[str, list[Sample]] = {}
        for name, (data, root) in zip(names, pairs):
            root = root or str(Path(data).parent)
            subsets[name] = load_eval_samples(
                data,
                root,
                limit,
                args.seed,
                need_image=args.task != "math",
                reward_method=settings.get("reward_method", "default"),
            )
            datasets[name] = {"file": str(Path(data).resolve()), "sha256": file_digest(data), "image_root": root}
        out = Path(args.out) if args.out else default_out(args, settings)
        open_output(out, settings, datasets, args.overwrite)
        build = jax_decoder if args.backend == "jax" else torch_decoder
        decoder = functools.cache(lambda: build(model_path, args, settings["task_type"], settings["max_new_tokens"]))
        summaries: dict[str, dict[str, Any]] = {}
        for name, samples in subsets.items():
            records = score_dataset(
                samples,
                RecordStore(out, name),
                decoder,
                scorer,
                batch_size=args.batch_size,
                progress=not args.no_progress,
                name=name,
            )
            summaries[name] = summarize(records)
            report = {"dataset": name, **datasets[name], "settings": settings, **summaries[name], "results": records}
            write_json_atomic(out / f"{args.task}_results_{name}.json", report)
    except (DataError, CheckpointError, OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    title = f"`vlmr1 eval {args.task}` of {model_path}" + (
        f" (protocol {settings['protocol']})" if "protocol" in settings else ""
    )
    table = results_table(args.task, summaries, title)
    (out / "results.md").write_text(table, encoding="utf-8")
    write_json_atomic(out / "results.json", {"settings": settings, "datasets": summaries})
    print(table + f"per-dataset records: {out}/{args.task}_results_<dataset>.json", flush=True)
    return 0


def _add_task(tasks: argparse._SubParsersAction, task: str, help_text: str) -> argparse.ArgumentParser:
    p = tasks.add_parser(
        task, help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        required=True,
        help="exported HF folder; with --backend jax also a vlmr1-jax checkpoint (run / step folder)",
    )
    p.add_argument("--data", required=True, action="append", help="VLM-R1 eval JSON list or jsonl; repeat for several")
    p.add_argument(
        "--image-root",
        action="append",
        help="folder the image paths are relative to: one, or one per --data (default: each data file's folder)",
    )
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    default_limit = DEFAULTS.get(task, {}).get("limit", 2000)
    p.add_argument("--limit", type=int, help=f"samples after the seeded shuffle (0 = all; default {default_limit})")
    p.add_argument("--seed", type=int, default=42, help="shuffle seed (VLM-R1: 42)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, help="default: the protocol's (rec 256) or 1024 (ovd, math)")
    p.add_argument("--min-pixels", type=int, help="default: the release's preprocessor_config.json, else 3136")
    p.add_argument("--max-pixels", type=int, help="default: the release's preprocessor_config.json, else 12845056")
    p.add_argument(
        "--dtype",
        type=dtype_arg,
        choices=("float32", "bfloat16", "float16"),
        help="jax on an HF folder: default float32; torch: float32 on cpu, else the release's",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "npu"), default="auto", help="torch backend only")
    p.add_argument("--step", type=int, help="checkpoint step (jax backend; default: the latest)")
    p.add_argument(
        "--mesh",
        type=mesh_arg,
        default=MeshConfig(data=-1, fsdp=1),
        metavar="DATA,FSDP,TENSOR",
        help="jax backend: the device mesh the weights are sharded and the batches split over, as in training "
        "(-1 = the remaining devices; default -1,1,1: every device decodes its share of each batch)",
    )
    p.add_argument("--out", help="results folder (default: runs/eval/<task>-<model>[-<protocol>]); re-run to resume")
    p.add_argument(
        "--overwrite", action="store_true", help="discard the results already in --out (a folder vlmr1 wrote)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_eval)
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model with VLM-R1's protocols (rec, ovd, math)")
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    rec = _add_task(tasks, "rec", "REC Acc@0.5 (RefCOCO/+/g, LISA) with VLM-R1's r1 or baseline protocol")
    rec.add_argument(
        "--protocol",
        help=f"{' | '.join(protocol_names())} (VLM-R1's test_rec_r1 / test_rec_baseline; a family's name: its own), "
        "or package.module:ATTRIBUTE (default: the model family's own protocol, else r1)",
    )
    for task, help_text in (
        ("ovd", "open-vocabulary detection: dataset-level COCO mAP / AP50 and OVDEval NMS-AP"),
        ("math", "math / multiple-choice accuracy with VLM-R1's accuracy reward (math_verify)"),
    ):
        sub = _add_task(tasks, task, help_text)
        sub.add_argument(
            "--task-type", help=f"question template (default {DEFAULTS[task]['task_type']}), or a '{{Question}}' string"
        )
        if task == "math":
            sub.add_argument(
                "--reward-method",
                default="default",
                help="accu_reward_method of samples that name none (default | math | mcq | ...)",
            )
