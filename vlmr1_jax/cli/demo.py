"""`vlmr1 demo`: the whole product on one CPU in minutes, with nothing downloaded.

Synthetic REC data -> a compact tokenizer for the task (a real `tokenizers` BPE with Qwen's special tokens and
chat template, plus one added token per coordinate 0..112) -> a tiny Qwen2.5-VL ("demo-s") -> SFT warm start ->
GRPO with the Qwen REC IoU and format rewards -> greedy evaluation of the in-domain (`val`) and out-of-domain
(`ood`: held-out colour+shape pairs) splits after SFT and after GRPO, and a picture of held-out boxes.
Sizes: docs/facts.md: The CPU demo. The prompt uses the bare question (no R1 instruction): the SFT target teaches
the `<think>`/`<answer>` format, and a short prompt halves every step on two cores.

What was tried (held-out greedy mean IoU, Acc@0.5; on two shared cores, so the times are upper bounds):
- digit tokens, 16-48 px shapes anywhere, SFT 800 x 16, GRPO 500: 0.0495 -> 0.0958, Acc@0.5 about 1%, 5.9 min.
- one token per coordinate, 24-48 px shapes on an 8-px grid, SFT 2000 x 32, GRPO 300: SFT 0.1383 / 11.3%, GRPO
  0.1830 / 11.9% (ood 0.1427 -> 0.2100). Its SFT model did not ground at all: its corners were further from the
  truth than the mean box's (32 vs 22 px), and on images with several shapes the shape nearest its box was the named
  one 37% of the time (chance: about 40%). Even on one-shape images, 450 SFT steps reached 3% Acc@0.5.
- position cues drawn into the images (colour ramps across the background, or over every pixel): 700 steps, no
  gain on several shapes; 14% instead of 3% on one shape. Not kept.
- the cause was the initialisation: transformers' std 0.02 for every weight leaves this model's attention scores
  and branch outputs near zero (its widths are 64-512, not thousands). With the linear kernels at std
  1/sqrt(fan_in) (`model.init=fan_in`) the SFT loss per token is 0.125 at step 1000 instead of 0.239, and these
  defaults give SFT 0.5026 / 50.4% (ood 0.4501 / 44.8%) and GRPO 0.5538 / 55.8% (ood 0.5178 / 52.8%), 25.7 min
  at load 2.4-6 (14.2 min from a fresh clone, mostly quiet). SFT lr 2e-3 instead of 1e-3: a slower loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flax import nnx
from tokenizers import AddedToken

from converters.release import export_release
from vlmr1_jax.config import (
    DataConfig,
    GRPOConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SamplingConfig,
    SFTConfig,
    TrainConfig,
    to_dict,
)
from vlmr1_jax.data.jsonl import Sample, load_jsonl_datasets
from vlmr1_jax.data.synthetic import PROMPT_PREFIX, Placement, corpus_strings, image_folder, write_default_dataset
from vlmr1_jax.eval.rec import GreedyDecoder, evaluate_rec, truth_box
from vlmr1_jax.models.family import get_family
from vlmr1_jax.processing.tokenizer import build_compact_tokenizer, qwen2_5_tokenizer
from vlmr1_jax.train.box_grid import Predicted, Shown, draw_box_grid
from vlmr1_jax.train.loop import GRPOTrainer
from vlmr1_jax.train.metrics import read_metrics
from vlmr1_jax.train.sft import SFTTrainer

QUESTION = "{Question}"
TARGET = '<think> </think><answer>{"bbox_2d": {answer}}</answer>'
TARGET_TOKENS = 30  # the target is 27 tokens with <|im_end|> (one token per coordinate)
EVAL_BATCH = 250
FRAME = 112  # the synthetic images' side, which the processor keeps: boxes are in 0..112
SPLIT_NAMES = {"val": "in domain", "ood": "out of domain"}  # the evaluated splits (data/synthetic.py)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    family: str = ModelConfig.family  # the model family of the demo's "demo-s" model
    seed: int = 0
    n_train: int = 4000
    n_eval: int = 1000
    n_ood: int = 500
    sft_steps: int = 2000
    grpo_steps: int = 300
    sft_batch: int = 32
    grpo_prompts: int = 8
    generations: int = 8
    n_show: int = 8  # held-out images in the picture
    min_size: int = 24  # shapes 24-48 px with corners and sizes on an 8-px grid: an easier task than the default data
    grid: int = 8


def demo_tokenizer(out: Path, seed: int, family: str = ModelConfig.family):
    """Byte-level BPE trained on every string the task produces: prompts, expressions, answers, with the family's
    own special tokens; each coordinate 0..112 is one token (Qwen's pre-tokenizer gives one token per digit)."""
    rng = random.Random(seed)
    qwen = qwen2_5_tokenizer()
    corpus = corpus_strings()
    processor = get_family(family).processor
    prompts = [processor.render_prompt(qwen, text, 1, QUESTION) for text in corpus]
    answers = [TARGET.replace("{answer}", json.dumps([rng.randrange(FRAME) for _ in range(4)])) for _ in range(3000)]
    tokenizer = build_compact_tokenizer(corpus + prompts + answers, vocab_size=512).with_special_tokens(
        processor.added_tokens, **processor.tokenizer_config
    )
    # Added tokens are matched before the pre-tokenizer splits digits.
    tokenizer.backend.add_tokens([AddedToken(str(n), normalized=False) for n in range(FRAME + 1)])
    tokenizer.save(out)
    return tokenizer


def demo_model(tokenizer_dir: Path, family: str = ModelConfig.family) -> ModelConfig:
    """The demo's "demo-s" model of `family` with the demo tokenizer, its linear kernels drawn at std
    1/sqrt(fan_in): from transformers' 0.02 this small model sits on a plateau for hundreds of SFT steps."""
    return ModelConfig(family=family, preset="demo-s", tokenizer=str(tokenizer_dir), init="fan_in")


def sft_config(
    train_file: str, images: str, model: ModelConfig, out_dir: Path, steps: int, batch: int, seed: int
) -> RunConfig:
    """The demo's SFT run: cross-entropy on the answer target, `batch` samples a step, from `model`."""
    return RunConfig(
        model=model,
        data=DataConfig(
            data_file_paths=train_file, image_folders=images, task_type=QUESTION, prompts_per_step=batch, seed=seed
        ),
        # Measured SFT settings: lr 1e-3, 100-step warm-up, constant, AdamW betas 0.9/0.95, wd 0.01, clip 1.0.
        optim=OptimConfig(learning_rate=1e-3, schedule="constant", warmup_steps=100, b2=0.95, weight_decay=0.01),
        sft=SFTConfig(target_template=TARGET, max_target_length=TARGET_TOKENS),
        train=TrainConfig(output_dir=str(out_dir), max_steps=steps, save_every=steps, log_every=50, seed=seed),
    )


def grpo_config(
    train_file: str,
    images: str,
    model: ModelConfig,
    out_dir: Path,
    steps: int,
    prompts: int,
    generations: int,
    seed: int,
) -> RunConfig:
    """The demo's GRPO run: VLM-R1's Qwen REC rewards and loss, `prompts` x `generations` samples a step."""
    return RunConfig(
        model=model,
        data=DataConfig(
            data_file_paths=train_file,
            image_folders=images,
            task_type=QUESTION,
            prompts_per_step=prompts,
            seed=seed + 1,
        ),
        sampling=SamplingConfig(max_new_tokens=TARGET_TOKENS, temperature=1.0, top_k=50, top_p=1.0),
        grpo=GRPOConfig(num_generations=generations, beta=0.04, reward_funcs=("rec_iou", "rec_format")),
        optim=OptimConfig(learning_rate=5e-5, schedule="constant", b2=0.99),
        train=TrainConfig(output_dir=str(out_dir), max_steps=steps, save_every=steps, log_every=10, seed=seed),
    )


def evaluate_splits(
    model, tokenizer, splits: Mapping[str, Sequence[Sample]], batch_size: int = EVAL_BATCH
) -> dict[str, tuple[dict[str, float], list[dict]]]:
    """Greedy decoding and VLM-R1's REC scoring of each named split with one compiled decoder:
    {split: (summary, per-sample records)}."""
    batch_size = min(batch_size, max(len(samples) for samples in splits.values()))  # a micro run: no padded rows
    decoder = GreedyDecoder(model, tokenizer, task_type=QUESTION, batch_size=batch_size, max_new_tokens=TARGET_TOKENS)
    return {name: evaluate_rec(decoder, samples) for name, samples in splits.items()}


def expression(sample: Sample) -> str:
    """The referring expression of a synthetic REC sample ("the red circle")."""
    return sample.problem.split(PROMPT_PREFIX)[-1].rstrip(".")


def demo_picture(samples: Sequence[Sample], stages: Mapping[str, Sequence[dict]], out: Path) -> Path:
    """The box grid of `samples` (the first ones of a split) with each stage's records for them."""
    shown = [Shown(s.image_paths[0], expression(s), truth_box(s)) for s in samples]
    predicted = {
        name: [Predicted(r["pred_box"], r["iou"]) for r in records[: len(samples)]] for name, records in stages.items()
    }
    return draw_box_grid(shown, predicted, out)


def reward_table(run_dir: Path) -> str:
    rows = [
        "step | reward | rewards/iou_reward | rewards/format_reward_rec | kl | completion_length",
        "---- | ------ | ------------------ | ------------------------- | -- | -----------------",
    ]
    for m in read_metrics(run_dir):
        rows.append(
            f"{m['step']:>4} | {m.get('reward', 0):.3f} | {m.get('rewards/iou_reward', 0):.3f} | "
            f"{m.get('rewards/format_reward_rec', 0):.3f} | {m.get('kl', 0):.4f} | "
            f"{m.get('completion_length', 0):.1f}"
        )
    return "\n".join(rows)


def save_hf_folder(model, out_dir: str | Path, tokenizer_dir: str | Path) -> Path:
    """The trained model as a float32 HF release folder (weights, config, tokenizer) that `model.hf_model` and
    transformers can load."""
    return export_release(
        nnx.split(model)[1], model.cfg, out_dir, target="hf", dtype="fp32", tokenizer_dir=tokenizer_dir, overwrite=True
    )


def report(stage: str, results: Mapping[str, tuple[dict[str, float], list[dict]]]) -> None:
    """One progress line per evaluated split."""
    for split, (summary, _) in results.items():
        print(
            f"[demo] after {stage}, {SPLIT_NAMES[split]} ({summary['n']} held-out): IoU {summary['iou']:.4f}  "
            f"Acc@0.5 {summary['accuracy']:.1f}%  format {summary['format']:.4f}",
            flush=True,
        )


def run_demo(demo: DemoConfig, progress: bool = True) -> dict[str, float]:
    start = time.perf_counter()
    out = Path(demo.out)
    print(f"[demo] synthetic REC data -> {out / 'data'}", flush=True)
    placement = Placement(min_size=demo.min_size, grid=demo.grid)
    data = write_default_dataset(
        str(out / "data"), demo.n_train, demo.n_eval, demo.n_ood, seed=demo.seed, placement=placement
    )
    images = image_folder(str(out / "data"))
    tokenizer = demo_tokenizer(out / "tokenizer", demo.seed, demo.family)
    print(f"[demo] compact tokenizer: {tokenizer.vocab_size} tokens -> {out / 'tokenizer'}", flush=True)
    splits = {split: load_jsonl_datasets(data[split], images)[0] for split in SPLIT_NAMES}

    print(f"[demo] SFT warm start: {demo.sft_steps} steps x {demo.sft_batch} samples", flush=True)
    model = demo_model(out / "tokenizer", demo.family)
    sft_cfg = sft_config(data["train"], images, model, out / "sft", demo.sft_steps, demo.sft_batch, demo.seed)
    sft = SFTTrainer.from_config(sft_cfg, progress=progress)
    sft.train()
    sft_model_dir = save_hf_folder(sft.model(), out / "sft" / "hf", out / "tokenizer")
    before = evaluate_splits(sft.model(), tokenizer, splits)
    report("SFT", before)

    print(
        f"[demo] GRPO: {demo.grpo_steps} steps x {demo.grpo_prompts} prompts x {demo.generations} samples", flush=True
    )
    grpo_cfg = grpo_config(
        data["train"],
        images,
        ModelConfig(hf_model=str(sft_model_dir)),
        out / "grpo",
        demo.grpo_steps,
        demo.grpo_prompts,
        demo.generations,
        demo.seed,
    )
    grpo = GRPOTrainer.from_config(grpo_cfg, progress=progress)
    grpo.train()
    after = evaluate_splits(grpo.model(), tokenizer, splits)
    print(reward_table(out / "grpo"))
    report("GRPO", after)
    picture = demo_picture(
        splits["val"][: demo.n_show],
        {"after SFT": before["val"][1], "after GRPO": after["val"][1]},
        out / "boxes.png",
    )
    print(f"[demo] picture of {demo.n_show} held-out samples, true and predicted boxes: {picture}", flush=True)
    seconds = time.perf_counter() - start
    result = {
        "iou_sft": before["val"][0]["iou"],
        "iou_grpo": after["val"][0]["iou"],
        "acc_sft": before["val"][0]["accuracy"] / 100.0,
        "acc_grpo": after["val"][0]["accuracy"] / 100.0,
        "ood_iou_sft": before["ood"][0]["iou"],
        "ood_iou_grpo": after["ood"][0]["iou"],
        "format_sft": before["val"][0]["format"],
        "format_grpo": after["val"][0]["format"],
    }
    (out / "demo_result.json").write_text(
        json.dumps(
            {
                **result,
                "steps": demo.grpo_steps,
                "seconds": seconds,
                "picture": str(picture),
                "summaries": {
                    stage: {k: v[0] for k, v in r.items()} for stage, r in (("sft", before), ("grpo", after))
                },
                "config": dataclasses.asdict(demo),
                "sft": to_dict(sft.cfg)["train"],
            },
            indent=2,
        )
    )
    fields = " ".join(f"{name}={value:.4f}" for name, value in result.items())
    print(f"demo: {fields} steps={demo.grpo_steps} seconds={seconds:.1f}", flush=True)
    return {**result, "steps": demo.grpo_steps, "seconds": seconds}


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One `--flag-name` per field of the dataclass `config_class`, typed and defaulted by the field's default."""
    defaults = config_class()
    for field in dataclasses.fields(config_class):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
        )


def config_from_flags(config_class: type, args: argparse.Namespace) -> Any:
    """The `config_class` instance of the flags `add_config_flags` added."""
    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="synthetic REC: SFT warm start, then GRPO, on CPU in minutes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(p, DemoConfig)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        run_demo(config_from_flags(DemoConfig, args), progress=not args.no_progress)
        return 0

    p.set_defaults(func=run)
