"""`vlmr1 demo`: the whole product on one CPU in minutes, with nothing downloaded.

Synthetic REC data -> a compact tokenizer for the task (a real `tokenizers` BPE with Qwen's special tokens and
chat template) -> a tiny Qwen2.5-VL ("demo-s") -> SFT warm start -> GRPO with the Qwen REC IoU and format rewards
-> greedy evaluation on >= 1000 held-out in-domain samples before and after GRPO. Sizes: docs/facts.md: The CPU demo.
The prompt uses the bare question (no R1 instruction): the SFT target teaches the `<think>`/`<answer>` format,
and a short prompt halves every step on two cores. A short SFT teaches the format and the average box (longer SFT
stays on that plateau for thousands of steps on this budget); GRPO then moves the boxes onto the objects.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

from flax import nnx

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
from vlmr1_jax.data.jsonl import load_jsonl_datasets
from vlmr1_jax.data.synthetic import corpus_strings, image_folder, write_default_dataset
from vlmr1_jax.eval.rec import GreedyDecoder, evaluate_rec
from vlmr1_jax.models.family import get_family
from vlmr1_jax.processing.tokenizer import build_compact_tokenizer, qwen2_5_tokenizer
from vlmr1_jax.train.loop import GRPOTrainer
from vlmr1_jax.train.metrics import read_metrics
from vlmr1_jax.train.sft import SFTTrainer

QUESTION = "{Question}"
TARGET = '<think> </think><answer>{"bbox_2d": {answer}}</answer>'
TARGET_TOKENS = 36
EVAL_BATCH = 250


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    family: str = ModelConfig.family  # the model family of the demo's "demo-s" model
    seed: int = 0
    n_train: int = 4000
    n_eval: int = 1000
    n_ood: int = 500
    sft_steps: int = 800
    grpo_steps: int = 500
    sft_batch: int = 16
    grpo_prompts: int = 8
    generations: int = 8


def demo_tokenizer(out: Path, seed: int, family: str = ModelConfig.family):
    """Byte-level BPE trained on every string the task produces: prompts, expressions, answers; with the family's
    own special tokens."""
    rng = random.Random(seed)
    qwen = qwen2_5_tokenizer()
    corpus = corpus_strings()
    processor = get_family(family).processor
    prompts = [processor.render_prompt(qwen, text, 1, QUESTION) for text in corpus]
    answers = [TARGET.replace("{answer}", json.dumps([rng.randrange(112) for _ in range(4)])) for _ in range(3000)]
    tokenizer = build_compact_tokenizer(corpus + prompts + answers, vocab_size=512).with_special_tokens(
        processor.added_tokens, **processor.tokenizer_config
    )
    tokenizer.save(out)
    return tokenizer


def sft_config(demo: DemoConfig, data: dict[str, str], images: str, tokenizer_dir: Path) -> RunConfig:
    return RunConfig(
        model=ModelConfig(family=demo.family, preset="demo-s", tokenizer=str(tokenizer_dir)),
        data=DataConfig(
            data_file_paths=data["train"],
            image_folders=images,
            task_type=QUESTION,
            prompts_per_step=demo.sft_batch,
            seed=demo.seed,
        ),
        # Measured SFT settings: lr 1e-3, 100-step warm-up, constant, AdamW betas 0.9/0.95, wd 0.01, clip 1.0.
        optim=OptimConfig(learning_rate=1e-3, schedule="constant", warmup_steps=100, b2=0.95, weight_decay=0.01),
        sft=SFTConfig(target_template=TARGET, max_target_length=TARGET_TOKENS),
        train=TrainConfig(
            output_dir=str(Path(demo.out) / "sft"),
            max_steps=demo.sft_steps,
            save_every=demo.sft_steps,
            log_every=50,
            seed=demo.seed,
        ),
    )


def grpo_config(demo: DemoConfig, data: dict[str, str], images: str, sft_model: Path) -> RunConfig:
    return RunConfig(
        model=ModelConfig(hf_model=str(sft_model)),
        data=DataConfig(
            data_file_paths=data["train"],
            image_folders=images,
            task_type=QUESTION,
            prompts_per_step=demo.grpo_prompts,
            seed=demo.seed + 1,
        ),
        sampling=SamplingConfig(max_new_tokens=TARGET_TOKENS, temperature=1.0, top_k=50, top_p=1.0),
        grpo=GRPOConfig(num_generations=demo.generations, beta=0.04, reward_funcs=("rec_iou", "rec_format")),
        optim=OptimConfig(learning_rate=5e-5, schedule="constant", b2=0.99),
        train=TrainConfig(
            output_dir=str(Path(demo.out) / "grpo"),
            max_steps=demo.grpo_steps,
            save_every=demo.grpo_steps,
            log_every=10,
            seed=demo.seed,
        ),
    )


def evaluate(model, tokenizer, samples) -> dict[str, float]:
    batch = min(EVAL_BATCH, len(samples))  # a micro run decodes its few samples, not 250 padded rows
    decoder = GreedyDecoder(model, tokenizer, task_type=QUESTION, batch_size=batch, max_new_tokens=TARGET_TOKENS)
    summary, _ = evaluate_rec(decoder, samples)
    return summary


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


def run_demo(demo: DemoConfig, progress: bool = True) -> dict[str, float]:
    start = time.perf_counter()
    out = Path(demo.out)
    print(f"[demo] synthetic REC data -> {out / 'data'}", flush=True)
    data = write_default_dataset(str(out / "data"), demo.n_train, demo.n_eval, demo.n_ood, seed=demo.seed)
    images = image_folder(str(out / "data"))
    tokenizer = demo_tokenizer(out / "tokenizer", demo.seed, demo.family)
    print(f"[demo] compact tokenizer: {tokenizer.vocab_size} tokens -> {out / 'tokenizer'}", flush=True)
    held_out, _ = load_jsonl_datasets(data["val"], images)

    print(f"[demo] SFT warm start: {demo.sft_steps} steps x {demo.sft_batch} samples", flush=True)
    sft = SFTTrainer.from_config(sft_config(demo, data, images, out / "tokenizer"), progress=progress)
    sft.train()
    sft_model_dir = save_hf_folder(sft.model(), out / "sft" / "hf", out / "tokenizer")
    before = evaluate(sft.model(), tokenizer, held_out)
    print(
        f"[demo] after SFT on {before['n']} held-out: IoU {before['iou']:.4f}  format {before['format']:.4f}  "
        f"Acc@0.5 {before['accuracy']:.1f}%",
        flush=True,
    )

    print(
        f"[demo] GRPO: {demo.grpo_steps} steps x {demo.grpo_prompts} prompts x {demo.generations} samples", flush=True
    )
    grpo = GRPOTrainer.from_config(grpo_config(demo, data, images, sft_model_dir), progress=progress)
    grpo.train()
    after = evaluate(grpo.model(), tokenizer, held_out)
    print(reward_table(out / "grpo"))
    print(
        f"[demo] after GRPO on {after['n']} held-out: IoU {after['iou']:.4f}  format {after['format']:.4f}  "
        f"Acc@0.5 {after['accuracy']:.1f}%",
        flush=True,
    )
    seconds = time.perf_counter() - start
    result = {
        "iou_sft": before["iou"],
        "iou_grpo": after["iou"],
        "format_sft": before["format"],
        "format_grpo": after["format"],
        "steps": demo.grpo_steps,
        "seconds": seconds,
    }
    (out / "demo_result.json").write_text(
        json.dumps({**result, "config": dataclasses.asdict(demo), "sft": to_dict(sft.cfg)["train"]}, indent=2)
    )
    print(
        f"demo: iou_sft={result['iou_sft']:.4f} iou_grpo={result['iou_grpo']:.4f} "
        f"format_sft={result['format_sft']:.4f} format_grpo={result['format_grpo']:.4f} "
        f"steps={result['steps']} seconds={seconds:.1f}",
        flush=True,
    )
    return result


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="synthetic REC: SFT warm start, then GRPO, on CPU in minutes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = DemoConfig()
    for field in dataclasses.fields(DemoConfig):
        p.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
        )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        demo = DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)})
        run_demo(demo, progress=not args.no_progress)
        return 0

    p.set_defaults(func=run)
