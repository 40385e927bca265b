"""Our grouped sampler vs HF `generate` on the same random Qwen2.5-VL, the same prompts and images, the same work.

Two baselines: VLM-R1's rollout (each prompt row repeated G times, one `generate` over P*G rows, so every row
prefills and encodes its image) and `num_return_sequences=G` (HF prefills each prompt once, then expands). Ours
prefills each prompt once and fans the KV cache out to G rows (`rl/sampler.py`), through the trainer's own
`make_generate_fn`. All sample exactly T new tokens (temperature 1, top-k 50; EOS never ends a sample).

The decode step time is (time for T tokens - time for 1 token) / (T - 1), set against the machine's floor for that
step measured in the same run (`common.decode_floor`) and against the step's matrix products alone (every decoder
and LM-head product of one step on the same rows, in an XLA loop and in torch): what the step spends beyond them is
attention, norms, sampling and the loop. Our sampler is also timed computing in bfloat16 (half the weight bytes).

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
from vlmr1_jax.models.hf_weights import load_hf_model
from vlmr1_jax.models.layers import matmul
from vlmr1_jax.train.loop import make_generate_fn


def ours(setup: Setup, batch, new_tokens: int, repeats: int, model=None) -> float:
    """Median seconds of the trainer's jitted grouped sampler for P prompts x G samples x `new_tokens` (on
    `model`, default the workload's)."""
    work = setup.work
    cfg = RunConfig(
        sampling=SamplingConfig(max_new_tokens=new_tokens, temperature=work.temperature, top_k=work.top_k),
        grpo=GRPOConfig(num_generations=work.generations),
    )
    never_ends = types.SimpleNamespace(eos_ids=(-1,), pad_id=setup.tokenizer.pad_id)  # exactly T tokens per row
    model = model or setup.model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    generate = make_generate_fn(cfg, never_ends, model.cfg, graphdef)
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


def decode_step_matrices(setup: Setup, seed: int = 0) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Random fp32 matrices shaped like every weight one decode step multiplies by: per layer q, k, v, o, gate, up,
    down ([in, out]), then the LM head."""
    t = setup.model.cfg.text
    h, kv = t.hidden_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, t.intermediate_size), (h, t.intermediate_size)]
    shapes.append((t.intermediate_size, h))
    rng = np.random.default_rng(seed)
    draw = lambda shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)
    return [[draw(s) for s in shapes] for _ in range(t.num_hidden_layers)], draw((h, t.vocab_size))


def decode_products(x, layers, head, matmul):
    """One decode step's matrix products on hidden states x [rows, hidden] (tiny elementwise glue keeps every
    product live and makes each layer read the previous one's output)."""
    for wq, wk, wv, wo, wg, wu, wd in layers:
        k, v = matmul(x, wk), matmul(x, wv)
        x = x + 1e-3 * (matmul(matmul(x, wq), wo) + matmul(matmul(x, wg) * matmul(x, wu), wd))
        x = x + 1e-3 * (k.sum(-1) + v.sum(-1))[:, None]
    return x + 1e-6 * matmul(x, head).sum(-1)[:, None]


def matmuls_only_ms(setup: Setup, rows: int, steps: int, repeats: int) -> dict[str, float]:
    """Milliseconds per decode step of the step's matrix products alone (`rows` rows), `steps` steps in an XLA
    while loop and in a torch loop in fp32, and in XLA with bf16 weights through our bf16 `matmul`: the part of a
    decode step no implementation avoids."""
    import torch

    layers, head = decode_step_matrices(setup)
    x0 = np.random.default_rng(1).standard_normal((rows, head.shape[0])).astype(np.float32)
    xla_layers, xla_head = jax.tree.map(jnp.asarray, (layers, head))

    @jax.jit
    def xla_loop(x):
        return jax.lax.fori_loop(0, steps, lambda _, x: decode_products(x, xla_layers, xla_head, jnp.dot), x)

    x = jnp.asarray(x0)
    xla = median_seconds(lambda: jax.block_until_ready(xla_loop(x)), repeats)[0]
    bf16_layers, bf16_head = jax.tree.map(lambda w: w.astype(jnp.bfloat16), (xla_layers, xla_head))

    @jax.jit
    def xla_bf16_loop(x):
        return jax.lax.fori_loop(0, steps, lambda _, x: decode_products(x, bf16_layers, bf16_head, matmul), x)

    x16 = x.astype(jnp.bfloat16)
    xla_bf16 = median_seconds(lambda: jax.block_until_ready(xla_bf16_loop(x16)), repeats)[0]
    torch_layers, torch_head = [[torch.from_numpy(w) for w in ws] for ws in layers], torch.from_numpy(head)

    @torch.no_grad()
    def torch_loop():
        x = torch.from_numpy(x0)
        for _ in range(steps):
            x = decode_products(x, torch_layers, torch_head, torch.matmul)

    eager = median_seconds(torch_loop, repeats)[0]
    per_step = lambda seconds: round(1e3 * seconds / steps, 3)
    return {"xla": per_step(xla), "torch": per_step(eager), "xla_bf16": per_step(xla_bf16)}


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
        bf16_model = load_hf_model(setup.folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
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
    bf16 = {"T": ours(setup, batch, T, args.repeats, bf16_model), "1": ours(setup, batch, 1, args.repeats, bf16_model)}
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
    result["ours_bf16"] = {
        "seconds": round(bf16["T"], 4),
        "decode_step_ms": round(1e3 * (bf16["T"] - bf16["1"]) / (T - 1), 3),
    }
    result["decode_matmuls_only_ms"] = matmuls_only_ms(setup, rows, T, args.repeats)
    result["speedup_vs_hf_repeat"] = round(seconds["hf_repeat"] / seconds["ours"], 2)
    result["speedup_vs_hf_nrs"] = round(seconds["hf_nrs"] / seconds["ours"], 2)
    record("sampler", result)


if __name__ == "__main__":
    main()
