"""Our grouped sampler vs HF `generate` on the same random Qwen2.5-VL, the same prompts and images, the same work.

Two baselines: VLM-R1's rollout (each prompt row repeated G times, one `generate` over P*G rows, so every row
prefills and encodes its image) and `num_return_sequences=G` (HF prefills each prompt once, then expands). Ours
prefills each prompt once and fans the KV cache out to G rows (`rl/sampler.py`), through the trainer's own
`make_generate_fn`. All sample exactly T new tokens (temperature 1, top-k 50; EOS never ends a sample).

The decode step time is (time for T tokens - time for 1 token) / (T - 1), set against the machine's floor for that
step measured in the same run (`common.decode_floor`).

    python -m benchmarks.bench_sampler [--config small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.bench_machine import machine_limits
from benchmarks.common import (
    WORKLOADS,
    Setup,
    build_setup,
    decode_floor,
    median_seconds,
    prompt_batch,
    record,
    set_torch_threads,
    workload,
)
from vlmr1_jax.config import GRPOConfig, RunConfig, SamplingConfig
from vlmr1_jax.train.loop import make_generate_fn


def ours(setup: Setup, batch, new_tokens: int, repeats: int) -> float:
    """Median seconds of the trainer's jitted grouped sampler for P prompts x G samples x `new_tokens`."""
    work = setup.work
    cfg = RunConfig(
        sampling=SamplingConfig(max_new_tokens=new_tokens, temperature=work.temperature, top_k=work.top_k),
        grpo=GRPOConfig(num_generations=work.generations),
    )
    never_ends = types.SimpleNamespace(eos_ids=(-1,), pad_id=setup.tokenizer.pad_id)  # exactly T tokens per row
    graphdef, params, rest = nnx.split(setup.model, nnx.Param, ...)
    generate = make_generate_fn(cfg, never_ends, setup.model.cfg, graphdef)
    prompts = {k: jnp.asarray(v) for k, v in batch.arrays().items()}
    keys = iter(range(1_000_000))
    run = lambda: jax.block_until_ready(generate(params, rest, prompts, jax.random.key(next(keys))))
    return median_seconds(run, repeats)[0]


def hf_inputs(setup: Setup, batch, images, rows_per_prompt: int) -> dict:
    """`generate` keyword inputs: each prompt (ids, mask, patch rows, grid) repeated `rows_per_prompt` times."""
    import torch

    image_token = setup.model.cfg.image_token_id
    input_ids = torch.from_numpy(np.repeat(batch.input_ids, rows_per_prompt, axis=0).astype(np.int64))
    return dict(
        input_ids=input_ids,
        attention_mask=torch.from_numpy(np.repeat(batch.attention_mask, rows_per_prompt, axis=0).astype(np.int64)),
        pixel_values=torch.from_numpy(
            np.concatenate([px for prompt in images for _ in range(rows_per_prompt) for px, _ in prompt])
        ),
        image_grid_thw=torch.tensor([grid for prompt in images for _ in range(rows_per_prompt) for _, grid in prompt]),
        mm_token_type_ids=(input_ids == image_token).long(),
    )


def hf(setup: Setup, hf_model, batch, images, new_tokens: int, repeats: int, *, return_sequences: bool) -> float:
    """Median seconds of HF `generate` for the same work: rows repeated G times, or `num_return_sequences=G`."""
    import torch

    work = setup.work
    G = work.generations
    inputs = hf_inputs(setup, batch, images, 1 if return_sequences else G)

    def run():
        with torch.no_grad():
            out = hf_model.generate(
                **inputs,
                do_sample=True,
                temperature=work.temperature,
                top_k=work.top_k,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                num_return_sequences=G if return_sequences else 1,
                pad_token_id=setup.tokenizer.pad_id,
            )
        assert out.shape == (work.prompts * G, batch.input_ids.shape[1] + new_tokens), out.shape

    return median_seconds(run, repeats)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="small", choices=sorted(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    set_torch_threads()
    work = workload(args.config)
    limits = machine_limits()
    with tempfile.TemporaryDirectory() as tmp:
        setup = build_setup(work, Path(tmp))
        hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).eval()
        batch, images = prompt_batch(setup)
    T, rows = work.new_tokens, work.prompts * work.generations
    tokens = rows * T

    seconds = {
        "ours": ours(setup, batch, T, args.repeats),
        "hf_repeat": hf(setup, hf_model, batch, images, T, args.repeats, return_sequences=False),
        "hf_nrs": hf(setup, hf_model, batch, images, T, args.repeats, return_sequences=True),
    }
    one = {
        "ours": ours(setup, batch, 1, args.repeats),
        "hf_repeat": hf(setup, hf_model, batch, images, 1, args.repeats, return_sequences=False),
        "hf_nrs": hf(setup, hf_model, batch, images, 1, args.repeats, return_sequences=True),
    }
    context = batch.input_ids.shape[1] + T // 2  # the mean KV-cache length a decode step reads
    floor = decode_floor(setup, rows, context, limits)
    result = {
        "config": work.name,
        "parameters": setup.parameters,
        "work": {
            "prompts": work.prompts,
            "G": work.generations,
            "new_tokens": T,
            "prompt_length": batch.input_ids.shape[1],
        },
        "repeats": args.repeats,
        "limits": limits,
        **floor,
    }
    for name, s in seconds.items():
        step_ms = 1e3 * (s - one[name]) / (T - 1)
        result[name] = {
            "seconds": round(s, 4),
            "tokens_per_s": round(tokens / s, 1),
            "first_token_seconds": round(one[name], 4),
            "decode_step_ms": round(step_ms, 3),
            "decode_vs_floor": round(step_ms / floor["floor_ms"], 2),
        }
    result["speedup_vs_hf_repeat"] = round(seconds["hf_repeat"] / seconds["ours"], 2)
    result["speedup_vs_hf_nrs"] = round(seconds["hf_nrs"] / seconds["ours"], 2)
    record("sampler", result)


if __name__ == "__main__":
    main()
