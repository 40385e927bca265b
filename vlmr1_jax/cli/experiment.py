"""`vlmr1 experiment sft-vs-rl`: does GRPO generalise where SFT memorises? VLM-R1's comparison on the built-in
synthetic REC data, small enough for a CPU.

One shared warm start (the demo's SFT, or `--warm-start`: an HF folder trained on the same data), then, for each
seed, SFT and GRPO for the same number of optimizer steps from it; every `--eval-every` steps the policy is decoded
greedily on the in-domain split (`val`: the training colour+shape pairs) and the out-of-domain split (`ood`:
held-out pairs) and scored with VLM-R1's REC protocol (Acc@0.5 and mean IoU). Writes `curves.jsonl` (one row per
evaluation), the per-sample predictions behind every row (`predictions/`), `sft-vs-rl.png` and `sft-vs-rl.md` (a
table per scoring protocol).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmr1_jax.cli.demo import (
    QUESTION,
    SPLIT_NAMES,
    TARGET_TOKENS,
    DemoConfig,
    add_config_flags,
    config_from_flags,
    demo_model,
    demo_tokenizer,
    grpo_config,
    save_hf_folder,
    sft_config,
)
from vlmr1_jax.config import ModelConfig
from vlmr1_jax.data.jsonl import Sample, load_jsonl_datasets
from vlmr1_jax.data.synthetic import Placement, image_folder, write_default_dataset
from vlmr1_jax.eval.protocols import BASELINE
from vlmr1_jax.eval.rec import Frames, GreedyDecoder, score_rec
from vlmr1_jax.models.hf_weights import load_hf_model
from vlmr1_jax.processing.tokenizer import Tokenizer
from vlmr1_jax.rl.state import current_model
from vlmr1_jax.train.base import Trainer
from vlmr1_jax.train.comparison import comparison_table, draw_comparison
from vlmr1_jax.train.loop import GRPOTrainer
from vlmr1_jax.train.sft import SFTTrainer

# The scoring protocols each evaluation reports: name -> (samples, completions, frames) -> (summary, records). Both
# score the same greedy completions of the demo's prompt: `r1` reads the first answer's braced box, `baseline` VLM-R1's
# permissive regex (the first [a, b, c, d] anywhere). Every row names its protocol.
Scorer = Callable[[Sequence[Sample], Sequence[str], Sequence[Frames]], tuple[dict[str, float], list[dict]]]
PROTOCOLS: dict[str, Scorer] = {"r1": score_rec, "baseline": functools.partial(score_rec, protocol=BASELINE)}
REPORTED_PROTOCOL = "r1"  # the one the figure and table show


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The command's flags (`--warm-steps` is `warm_steps`); the defaults take about 30 minutes on 2 cores."""

    out: str = "runs/sft-vs-rl"
    seeds: int = 2
    data_seed: int = 0
    n_train: int = 4000
    n_val: int = 300
    n_ood: int = 300
    min_size: int = DemoConfig.min_size  # the demo's images: shapes 24-48 px on an 8-px grid
    grid: int = DemoConfig.grid
    warm_steps: int = DemoConfig.sft_steps  # the shared SFT warm start: the demo's
    warm_start: str = ""  # an HF folder (e.g. a demo's sft/hf) to start from instead of training one
    steps: int = 300  # SFT and GRPO steps after it
    eval_every: int = 50
    sft_batch: int = DemoConfig.sft_batch  # the warm start's and the SFT arm's samples per step
    grpo_prompts: int = 8
    generations: int = 8
    eval_batch: int = 100


class Recorder:
    """Decodes the evaluation splits with a policy, scores them with every protocol, saves the predictions and
    appends one row per (split, protocol) to `curves.jsonl`."""

    def __init__(self, out: Path, splits: Mapping[str, Sequence[Sample]], tokenizer: Any, batch_size: int):
        self.out, self.splits, self.tokenizer, self.batch_size = out, splits, tokenizer, batch_size
        self.curves = out / "curves.jsonl"
        (out / "predictions").mkdir(parents=True, exist_ok=True)

    def evaluate(self, model: Any, name: str) -> list[dict[str, Any]]:
        """Rows (without method / seed / step) of `model` on every split; predictions go to predictions/NAME-*."""
        decoder = GreedyDecoder(
            model, self.tokenizer, task_type=QUESTION, batch_size=self.batch_size, max_new_tokens=TARGET_TOKENS
        )
        rows = []
        for split, samples in self.splits.items():
            completions, frames = decoder(samples)
            for protocol, scorer in PROTOCOLS.items():
                summary, records = scorer(samples, completions, frames)
                path = Path("predictions") / f"{name}-{split}-{protocol}.jsonl"
                with open(self.out / path, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
                rows.append(
                    {
                        "split": split,
                        "protocol": protocol,
                        "accuracy": summary["accuracy"] / 100.0,
                        "mean_iou": summary["mean_iou"],
                        "iou_reward": summary["iou"],
                        "format": summary["format"],
                        "n": summary["n"],
                        "predictions": str(path),
                    }
                )
        return rows

    def write(self, rows: Sequence[dict[str, Any]], **keys: Any) -> None:
        with open(self.curves, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({**keys, **row}) + "\n" for row in rows)


class EveryNSteps:
    """The trainer's validation hook (`Trainer.validation`): every `every` optimizer steps and at the run's last,
    the current policy goes through the `Recorder`; its rows also land in the run's metrics as `eval/<split>/*`."""

    def __init__(self, trainer: Trainer, recorder: Recorder, every: int, method: str, seed: int):
        self.trainer, self.recorder, self.every, self.method, self.seed = trainer, recorder, every, method, seed

    def after_phase(self, first: int, step: int, last: bool, state: Any) -> dict[str, float]:
        if not (step // self.every > first // self.every or last):
            return {}
        model = current_model(self.trainer.graphdef, state)
        rows = self.recorder.evaluate(model, f"{self.method}-seed{self.seed}-step{step:05d}")
        self.recorder.write(rows, method=self.method, seed=self.seed, step=step)
        return {
            f"eval/{row['split']}/{metric}": row[metric]
            for row in rows
            if row["protocol"] == REPORTED_PROTOCOL
            for metric in ("accuracy", "mean_iou")
        }


def run_experiment(exp: ExperimentConfig, progress: bool = True) -> dict[str, Path]:
    """The whole experiment; returns the paths of its JSONL, figure and table."""
    start = time.perf_counter()
    out = Path(exp.out)
    if (out / "curves.jsonl").exists():
        raise ValueError(f"{out / 'curves.jsonl'} exists: give a new --out (the experiment does not resume)")
    print(f"[sft-vs-rl] synthetic REC data -> {out / 'data'}", flush=True)
    placement = Placement(min_size=exp.min_size, grid=exp.grid)
    data = write_default_dataset(
        str(out / "data"), exp.n_train, exp.n_val, exp.n_ood, seed=exp.data_seed, placement=placement
    )
    images = image_folder(str(out / "data"))
    if exp.warm_start:
        warm_dir = Path(exp.warm_start)
        print(f"[sft-vs-rl] shared warm start: {warm_dir}", flush=True)
        tokenizer = Tokenizer.load(warm_dir)
        warm_model = load_hf_model(warm_dir)
    else:
        tokenizer = demo_tokenizer(out / "tokenizer", exp.data_seed)
        print(f"[sft-vs-rl] shared warm start: SFT {exp.warm_steps} steps x {exp.sft_batch} samples", flush=True)
        model = demo_model(out / "tokenizer")
        warm = SFTTrainer.from_config(
            sft_config(data["train"], images, model, out / "warm", exp.warm_steps, exp.sft_batch, exp.data_seed),
            progress=progress,
        )
        warm.train()
        warm_model = warm.model()
        warm_dir = save_hf_folder(warm_model, out / "warm" / "hf", out / "tokenizer")
    splits = {split: load_jsonl_datasets(data[split], images)[0] for split in SPLIT_NAMES}
    recorder = Recorder(out, splits, tokenizer, exp.eval_batch)
    warm_rows = recorder.evaluate(warm_model, "warm-step00000")
    start_from = ModelConfig(hf_model=str(warm_dir))
    for seed in range(exp.seeds):
        for method in ("sft", "grpo"):
            recorder.write(warm_rows, method=method, seed=seed, step=0)
            run = out / f"seed{seed}" / method
            print(f"[sft-vs-rl] seed {seed}: {method} for {exp.steps} steps -> {run}", flush=True)
            if method == "sft":
                cfg = sft_config(data["train"], images, start_from, run, exp.steps, exp.sft_batch, seed)
                trainer: Trainer = SFTTrainer.from_config(cfg, progress=progress)
            else:
                cfg = grpo_config(
                    data["train"], images, start_from, run, exp.steps, exp.grpo_prompts, exp.generations, seed
                )
                trainer = GRPOTrainer.from_config(cfg, progress=progress)
            trainer.validation = EveryNSteps(trainer, recorder, exp.eval_every, method, seed)
            trainer.train()
    rows = [json.loads(line) for line in recorder.curves.read_text().splitlines()]
    figure = draw_comparison(rows, SPLIT_NAMES, REPORTED_PROTOCOL, out / "sft-vs-rl.png")
    table = out / "sft-vs-rl.md"
    table.write_text(
        "\n".join(f"### Protocol `{name}`\n\n{comparison_table(rows, SPLIT_NAMES, name)}" for name in PROTOCOLS)
    )
    (out / "experiment.json").write_text(
        json.dumps({"config": dataclasses.asdict(exp), "seconds": time.perf_counter() - start}, indent=2)
    )
    print(table.read_text(), flush=True)
    print(f"[sft-vs-rl] {time.perf_counter() - start:.0f} s; figure {figure}", flush=True)
    return {"curves": recorder.curves, "figure": figure, "table": table}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `vlmr1 experiment sft-vs-rl [--flags]` to the command line."""
    p = subparsers.add_parser("experiment", help="experiments on the built-in synthetic data")
    experiments = p.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    q = experiments.add_parser(
        "sft-vs-rl",
        help="SFT vs GRPO from one warm start: in-domain and out-of-domain REC curves over seeds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(q, ExperimentConfig)
    q.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        exp = config_from_flags(ExperimentConfig, args)
        check(exp)
        run_experiment(exp, progress=not args.no_progress)
        return 0

    q.set_defaults(func=run)


def check(exp: ExperimentConfig) -> None:
    """Refuse sizes that cannot run, naming the flag."""
    names = ("seeds", "n_train", "n_val", "n_ood", "warm_steps", "steps", "eval_every", "sft_batch", "grpo_prompts")
    for name in (*names, "eval_batch"):
        if getattr(exp, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(exp, name)}")
    if exp.warm_start and not (Path(exp.warm_start) / "config.json").is_file():
        raise ValueError(f"--warm-start {exp.warm_start}: not an HF model folder (no config.json)")
    if exp.generations < 2:
        raise ValueError(f"--generations must be at least 2 (GRPO's advantages need a group), got {exp.generations}")
