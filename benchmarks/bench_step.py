"""Our whole GRPO step vs TRL's `GRPOTrainer` step on the same random model, prompts, images and lengths.

Ours is the trainer's own step (`GRPOTrainer.draw / prepare / dispatch`: grouped sampling, decoding and rewards on
the host, advantages, reference log-probs, the jitted update), timed until its update has finished. TRL's is one
`GRPOTrainer` optimizer step (generation, reference and old-policy forwards, loss, backward, AdamW), timed by a
callback. Both: G samples of P prompts, exactly T new tokens (our EOS never fires; TRL `min_new_tokens=T`), the
same temperature / top-k, beta, learning rate, `loss_type="grpo"`, `scale_rewards="group"`, the same reward
(VLM-R1's `format`), fp32. The first step (compilation for us) is reported apart from the median of the others.
Our step is also run computing in bfloat16 (`model.dtype: bfloat16`, float32 parameters): `bf16_speedup`.

Our first step is also timed in two fresh processes sharing an empty persistent compilation cache: cold, then warm
(what a second `vlmr1 train` of the same shapes pays).

    python -m benchmarks.bench_step [--config small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

from benchmarks.common import (
    QUESTION,
    WORKLOADS,
    Setup,
    Workload,
    build_setup,
    hf_processor,
    record,
    set_torch_threads,
    workload,
)
from vlmr1_jax.config import DataConfig, GRPOConfig, ModelConfig, OptimConfig, RunConfig, SamplingConfig, TrainConfig
from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.parallel.mesh import make_mesh
from vlmr1_jax.processing.tokenizer import Tokenizer
from vlmr1_jax.rewards import reward_functions

REWARD = "format"  # VLM-R1's format reward: a regex, the same cost on both sides


class NeverEnds(Tokenizer):
    """The workload's tokenizer with an EOS no token matches, so every completion is exactly T tokens."""

    eos_ids = (-1,)  # type: ignore[assignment]


def run_config(work: Workload, out: Path, dtype: str = "float32") -> RunConfig:
    pixels = work.image_size**2
    return RunConfig(
        model=ModelConfig(dtype=dtype),
        data=DataConfig(task_type=QUESTION, prompts_per_step=work.prompts, min_pixels=pixels, max_pixels=pixels),
        sampling=SamplingConfig(max_new_tokens=work.new_tokens, temperature=work.temperature, top_k=work.top_k),
        grpo=GRPOConfig(num_generations=work.generations, beta=work.beta, loss="grpo", reward_funcs=(REWARD,)),
        optim=OptimConfig(learning_rate=work.learning_rate, schedule="constant"),
        train=TrainConfig(output_dir=str(out), max_steps=10_000, save_every=10_000, rollout_log=False),
    )


def our_steps(setup: Setup, out: Path, steps: int, dtype: str = "float32") -> list[dict[str, float]]:
    """`steps` GRPO steps of the trainer computing in `dtype` (parameters stay float32), each: seconds in total,
    sampling, scoring, and (timed apart, after the step) the reference log-probs."""
    from vlmr1_jax.train.base import RunParts
    from vlmr1_jax.train.loop import GRPOTrainer

    tok = setup.tokenizer
    samples = [  # the P prompts once per step; the trainer shuffles them, and all have the same lengths and image size
        Sample(p + r * len(setup.questions), q, "", (path,), "default", "bench", p)
        for r in range(steps + 1)
        for p, (q, path) in enumerate(zip(setup.questions, setup.image_paths))
    ]
    model = setup.model
    if dtype != "float32":
        from vlmr1_jax.models.hf_weights import load_hf_model
        from vlmr1_jax.train.setup import dtype_of

        model = load_hf_model(setup.folder, dtype=dtype_of(dtype), param_dtype=jax.numpy.float32)
    parts = RunParts(make_mesh(), NeverEnds(tok.backend, tok.config, tok.chat_template), samples, model)
    trainer = GRPOTrainer(run_config(setup.work, out, dtype), parts, progress=False)
    times = []
    with jax.set_mesh(trainer.mesh):
        for _ in range(steps):
            start = time.perf_counter()
            drawn = trainer.draw()
            assert drawn is not None
            prepared = trainer.prepare(*drawn)
            metrics, pending = trainer.dispatch([prepared])
            jax.block_until_ready((trainer.state, pending))
            total = time.perf_counter() - start
            trainer.step += 1
            state, prompts = trainer.state, prepared.prompts
            tokens = jax.numpy.zeros((setup.work.prompts * setup.work.generations, setup.work.new_tokens), "int32")
            start = time.perf_counter()
            jax.block_until_ready(trainer.logprobs(state.reference, state.frozen, prompts, tokens, tokens + 1))
            times.append(
                {
                    "step": total,
                    "sample": metrics["time/sample"],
                    "score": metrics["time/score"],
                    "reference": time.perf_counter() - start,
                }
            )
    trainer.close()
    return times


def trl_steps(setup: Setup, out: Path, steps: int) -> tuple[list[float], dict[str, float]]:
    """`steps` TRL `GRPOTrainer` optimizer steps: each one's seconds, and TRL's logged means of the measured steps."""
    import torch
    from datasets import Dataset
    from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig as TRLConfig, GRPOTrainer as TRLTrainer

    work = setup.work
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    our_reward = next(iter(reward_functions((REWARD,), {}, setup.tokenizer).values()))

    def format_reward(completions, **kwargs):  # TRL passes conversational completions as message lists
        return list(our_reward([c[0]["content"] if isinstance(c, list) else c for c in completions]))

    rows = [
        {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], "image": image}
        for _ in range(steps + 1)
        for q, image in zip(setup.questions, setup.images)
    ]
    args = TRLConfig(
        output_dir=str(out),
        per_device_train_batch_size=work.prompts * work.generations,
        num_generations=work.generations,
        max_completion_length=work.new_tokens,
        temperature=work.temperature,
        top_k=work.top_k,
        top_p=1.0,
        generation_kwargs={"min_new_tokens": work.new_tokens},
        beta=work.beta,
        learning_rate=work.learning_rate,
        lr_scheduler_type="constant",
        loss_type="grpo",
        scale_rewards="group",
        max_steps=steps,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        seed=0,
    )
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(setup.folder, dtype=torch.float32)
    trainer = TRLTrainer(
        model=model,
        reward_funcs=format_reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=hf_processor(setup),
        callbacks=[Timer()],
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry][1:]
    lengths = {entry.get("completions/mean_length") for entry in logs}
    assert lengths <= {float(work.new_tokens)}, f"TRL completions were not all {work.new_tokens} tokens: {lengths}"
    logged = {k: statistics.median(e[k] for e in logs) for k in logs[0] if k.startswith("timing") or "time" in k}
    return times, logged


def first_step_child(config: str, cache: str) -> float:
    """Our first step in a fresh process with the persistent compilation cache at `cache`."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_step", "--config", config, "--first-step-only", cache],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["first_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=sorted(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=3, help="measured steps after the first and one warm-up")
    parser.add_argument("--first-step-only", metavar="CACHE_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = workload(args.config)

    if args.first_step_only:
        jax.config.update("jax_compilation_cache_dir", args.first_step_only)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        with tempfile.TemporaryDirectory() as tmp:
            setup = build_setup(work, Path(tmp) / "model")
            print(json.dumps({"first_step": our_steps(setup, Path(tmp) / "run", 1)[0]["step"]}))
        return

    set_torch_threads()
    steps = 2 + args.repeats  # first (compile), one warm-up, then the measured ones
    with tempfile.TemporaryDirectory() as tmp:
        setup = build_setup(work, Path(tmp) / "model")
        ours = our_steps(setup, Path(tmp) / "ours", steps)
        ours_bf16 = our_steps(setup, Path(tmp) / "ours_bf16", steps, "bfloat16")
        trl, trl_logged = trl_steps(setup, Path(tmp) / "trl", steps)
    with tempfile.TemporaryDirectory() as cache:
        cold = first_step_child(args.config, cache)
        warm = first_step_child(args.config, cache)

    median = lambda key, steps=ours: statistics.median(t[key] for t in steps[2:])
    ours_step, trl_step = median("step"), statistics.median(trl[2:])
    bf16_step = median("step", ours_bf16)
    result = {
        "config": work.name,
        "parameters": setup.parameters,
        "work": {"prompts": work.prompts, "G": work.generations, "new_tokens": work.new_tokens},
        "workload": dataclasses.asdict(work),
        "repeats": args.repeats,
        "ours": {
            "step": round(ours_step, 4),
            "sample": round(median("sample"), 4),
            "score": round(median("score"), 4),
            "reference": round(median("reference"), 4),
            "train": round(ours_step - median("sample") - median("score") - median("reference"), 4),
            "first_step": round(ours[0]["step"], 3),
            "first_step_cold_cache_process": round(cold, 3),
            "first_step_warm_cache_process": round(warm, 3),
            "steps": [round(t["step"], 4) for t in ours],
        },
        "trl": {
            "step": round(trl_step, 4),
            "first_step": round(trl[0], 3),
            "steps": [round(t, 4) for t in trl],
            "logged": trl_logged,
        },
        "ours_bf16": {
            "step": round(bf16_step, 4),
            "sample": round(median("sample", ours_bf16), 4),
            "reference": round(median("reference", ours_bf16), 4),
            "steps": [round(t["step"], 4) for t in ours_bf16],
        },
        "speedup": round(trl_step / ours_step, 2),
        "bf16_speedup": round(ours_step / bf16_step, 2),
    }
    record("step", result)


if __name__ == "__main__":
    main()
