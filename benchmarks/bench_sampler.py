"""Grouped sampler vs HF `generate` on the same random Qwen2.5-VL, same prompts, same work; ratio in one run.

VLM-R1 samples by repeating each prompt G times and calling `model.generate` (docs/facts.md: Sampling), so the baseline
prefills and encodes the images of all P*G rows; ours prefills P prompts once and fans the KV cache out to G rows.
Both sample T new tokens with temperature 1, top-k 50 (EOS ignored so the work is equal).

    python benchmarks/bench_sampler.py [--prompts 8] [--generations 8] [--new-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.hf import save_hf_safetensors
from vlmr1_jax.config import SamplingConfig
from vlmr1_jax.models.qwen2_5_vl.config import TOKEN_ID_FIELDS, get_preset, to_hf_config, with_overrides
from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL
from vlmr1_jax.models.qwen2_5_vl.processor import build_prompt_batch
from vlmr1_jax.rl.sampler import Sampler

# The demo-sized model ("demo-s") with the tiny preset's vocabulary and special token ids.
BENCH_CONFIG = with_overrides(
    get_preset("demo-s"),
    {
        "text.vocab_size": get_preset("tiny").text.vocab_size,
        **{k: getattr(get_preset("tiny"), k) for k in TOKEN_ID_FIELDS},
    },
)


def build_models(folder: Path):
    """Our randomly initialised BENCH_CONFIG model, and transformers' model of the same weights (written to
    `folder` as an HF checkpoint and read back)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    ours = Qwen25VL(BENCH_CONFIG, rngs=nnx.Rngs(0))
    (folder / "config.json").write_text(json.dumps(to_hf_config(BENCH_CONFIG, "float32")))
    save_hf_safetensors(nnx.state(ours), BENCH_CONFIG, folder / "model.safetensors")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, hf


def make_prompts(prompts: int, rng: np.random.Generator):
    """P prompts: text, one 112x112 image (16 merged tokens), text; random pixels."""
    ids, images = [], []
    for p in range(prompts):
        ids.append([5 + p, 6, 7, 152, 150, 153] + list(rng.integers(2, 140, 12)))
        images.append([(rng.standard_normal((64, 1176)).astype(np.float32), (1, 8, 8))])
    return ids, images


def time_best(fn, repeats: int) -> float:
    fn()  # warm-up (compilation for JAX)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = build_models(Path(tmp))
    cfg = ours.cfg
    ids, images = make_prompts(args.prompts, rng)
    batch = build_prompt_batch(ids, images, cfg, pad_id=0)
    G, T = args.generations, args.new_tokens

    graphdef, state = nnx.split(ours)
    sampler = Sampler(SamplingConfig(max_new_tokens=T, temperature=1.0, top_k=50), eos_ids=(-1,), pad_id=0)
    run = sampler.jitted(graphdef, G)
    device_batch = {k: jnp.asarray(v) for k, v in batch.arrays().items()}
    keys = iter(range(10_000))
    ours_s = time_best(
        lambda: jax.block_until_ready(run(state, device_batch, jax.random.key(next(keys)))), args.repeats
    )

    # VLM-R1's rollout: every prompt row repeated G times, one generate call over P*G rows.
    input_ids = torch.from_numpy(np.repeat(batch.input_ids, G, axis=0).astype(np.int64))
    mask = torch.from_numpy(np.repeat(batch.attention_mask, G, axis=0).astype(np.int64))
    pixels = torch.from_numpy(
        np.concatenate([np.concatenate([px for px, _ in imgs]) for imgs in images for _ in range(G)])
    )
    grids = torch.tensor([g for imgs in images for _ in range(G) for _, g in imgs])

    def hf_generate():
        with torch.no_grad():
            hf.generate(
                input_ids=input_ids,
                attention_mask=mask,
                pixel_values=pixels,
                image_grid_thw=grids,
                mm_token_type_ids=(input_ids == cfg.image_token_id).long(),
                do_sample=True,
                temperature=1.0,
                top_k=50,
                top_p=1.0,
                max_new_tokens=T,
                min_new_tokens=T,
                pad_token_id=0,
            )

    hf_s = time_best(hf_generate, args.repeats)
    tokens = args.prompts * G * T
    print(
        f"work: {args.prompts} prompts x {G} samples x {T} new tokens ({tokens} tokens), "
        f"model hidden {cfg.text.hidden_size}, {jax.devices()[0].platform}"
    )
    print(f"HF generate (VLM-R1 style): {hf_s:.3f} s  ({tokens / hf_s:,.0f} tok/s)")
    print(f"vlmr1-jax grouped sampler : {ours_s:.3f} s  ({tokens / ours_s:,.0f} tok/s)")
    print(f"speed-up: {hf_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
