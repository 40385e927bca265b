"""Group-size scaling: our GRPO step at G = 1, 2, 4, 8, 16 samples per prompt, the same P prompts, split into
sampling, reference log-probs and the jitted update.

The step is the trainer's own jitted functions (`make_generate_fn`, `make_logprob_fn`, `make_grpo_step`) on the
trainer's state (`init_train_state`); advantages are random (the trainer's group advantages need G >= 2, and their
values do not change the work). Prefill and the image encoder run once per prompt whatever G is, so only the
decode loop and the completion tokens should grow with G.

    python -m benchmarks.bench_scaling [--config small] [--groups 1 2 4 8 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
import types
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import WORKLOADS, build_setup, prompt_batch, record, workload
from vlmr1_jax.config import GRPOConfig, OptimConfig, RunConfig, SamplingConfig
from vlmr1_jax.parallel.mesh import make_mesh
from vlmr1_jax.processing.batch import to_device
from vlmr1_jax.rl.rollout import TrainExample
from vlmr1_jax.rl.state import init_train_state, make_optimizer
from vlmr1_jax.rl.step import make_grpo_step, make_logprob_fn
from vlmr1_jax.train.loop import make_generate_fn
from vlmr1_jax.train.setup import on_mesh


def time_group(setup, prompts, G: int, repeats: int) -> dict[str, float]:
    """Median seconds of sampling, reference log-probs, update and the whole step at group size G (after the
    first step, which compiles, and one warm-up)."""
    work = dataclasses.replace(setup.work, generations=G)
    cfg = RunConfig(
        sampling=SamplingConfig(max_new_tokens=work.new_tokens, temperature=work.temperature, top_k=work.top_k),
        grpo=GRPOConfig(num_generations=G, beta=work.beta),
        optim=OptimConfig(learning_rate=work.learning_rate, schedule="constant"),
    )
    tx, schedule = make_optimizer(cfg.optim, 1000)
    graphdef, state = init_train_state(setup.model, "full", tx, with_reference=True)
    state = on_mesh(state, make_mesh())
    never_ends = types.SimpleNamespace(eos_ids=(-1,), pad_id=setup.tokenizer.pad_id)  # exactly T tokens per row
    generate = make_generate_fn(cfg, never_ends, setup.model.cfg, graphdef)
    logprobs = make_logprob_fn(graphdef, G)
    step = make_grpo_step(graphdef, cfg.grpo, tx, schedule)
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {"sample": [], "reference": [], "train": [], "step": []}
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        rollout = jax.block_until_ready(generate(state.trainable, state.frozen, prompts, jax.random.key(i)))
        t1 = time.perf_counter()
        ref = jax.block_until_ready(logprobs(state.reference, state.frozen, prompts, rollout.tokens, rollout.mask))
        t2 = time.perf_counter()
        advantages = rng.standard_normal(work.prompts * G).astype(np.float32)
        state, metrics = step(state, TrainExample(prompts, rollout.tokens, rollout.mask, advantages, ref))
        jax.block_until_ready((state, metrics))
        t3 = time.perf_counter()
        if i >= 2:
            for key, seconds in (("sample", t1 - t0), ("reference", t2 - t1), ("train", t3 - t2), ("step", t3 - t0)):
                times[key].append(seconds)
    return {key: round(statistics.median(values), 4) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=sorted(WORKLOADS))
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = workload(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        setup = build_setup(work, Path(tmp))
        batch, _ = prompt_batch(setup)
    mesh = make_mesh()
    with jax.set_mesh(mesh):
        prompts = to_device(batch, mesh)
        by_group = {G: time_group(setup, prompts, G, args.repeats) for G in args.groups}
    base = by_group[min(by_group)]
    record(
        "scaling",
        {
            "config": work.name,
            "parameters": setup.parameters,
            "work": {"prompts": work.prompts, "new_tokens": work.new_tokens},
            "repeats": args.repeats,
            "groups": {
                str(G): {**t, "step_vs_smallest_G": round(t["step"] / base["step"], 2)} for G, t in by_group.items()
            },
        },
    )


if __name__ == "__main__":
    main()
