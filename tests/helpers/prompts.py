"""Random multimodal prompts for the sampler / train-step tests, the matching transformers inputs, and the fixed
four-prompt training batch (prompts + completions) that the train-step, LoRA and mixed-precision tests share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vlmr1_jax.models.processor import PromptBatch
from vlmr1_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from vlmr1_jax.models.qwen2_5_vl.processor import build_prompt_batch

PAD = 2  # prompt padding and the token written after EOS (never an ordinary text token in these prompts)

# The training batch: four prompts (the batch axis splits over data x fsdp = 4) of (text before, image grids, text
# after), G = 2 samples each, completions of T tokens.
SPECS = [
    ([5, 6], [(1, 4, 4)], [7, 8, 9]),
    ([10], [(1, 4, 6)], [11, 12, 13, 14, 15, 16, 17]),
    ([20, 21, 22], [(1, 4, 4)], [23]),
    ([30], [(1, 6, 4)], [31, 32, 33, 34]),
]
G, T = 2, 6
LENGTH, WINDOWS = 32, 8  # forced so the half batches (gradient accumulation) share one compiled program


def prompt_rows(cfg: Qwen25VLConfig, specs, seed: int = 0) -> tuple[list[list[int]], list[list]]:
    """Token ids (one placeholder per image) and (random pixels, grid) per image, per prompt of `specs`."""
    rng = np.random.default_rng(seed)
    ids, images = [], []
    for before, grids, after in specs:
        row = list(before)
        imgs = []
        for grid in grids:
            row += [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id]
            imgs.append((rng.standard_normal((int(np.prod(grid)), cfg.vision.patch_dim)).astype(np.float32), grid))
        ids.append(row + list(after))
        images.append(imgs)
    return ids, images


def device_prompts(batch: PromptBatch) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.arrays().items()}


def hf_inputs(
    batch: PromptBatch,
    pixels: list[list[np.ndarray]],
    cfg: Qwen25VLConfig,
    repeat: int = 1,
    completions: np.ndarray | None = None,
    completions_mask: np.ndarray | None = None,
) -> dict:
    """transformers inputs for the same rows (prompt p repeated `repeat` times, completions appended), with
    `mm_token_type_ids` so HF computes its own 3-D M-RoPE positions."""
    import torch

    ids = np.repeat(batch.input_ids, repeat, axis=0).astype(np.int64)
    mask = np.repeat(batch.attention_mask, repeat, axis=0).astype(np.int64)
    if completions is not None:
        ids = np.concatenate([ids, completions.astype(np.int64)], axis=1)
        mask = np.concatenate([mask, completions_mask.astype(np.int64)], axis=1)
    rows = [p for p in range(len(pixels)) for _ in range(repeat)]
    ids_t = torch.from_numpy(ids)
    return {
        "input_ids": ids_t,
        "attention_mask": torch.from_numpy(mask),
        "pixel_values": torch.from_numpy(np.concatenate([px for p in rows for px in pixels[p]])),
        "image_grid_thw": torch.tensor([g for p in rows for g in batch.image_grids[p]]),
        "mm_token_type_ids": (ids_t == cfg.image_token_id).long(),
    }


def hf_completion_logprobs(hf, inputs: dict, prompt_len: int, tokens: np.ndarray) -> np.ndarray:
    """float64 log p(token) of each completion position from HF's logits."""
    import torch

    with torch.no_grad():
        logits = hf(**inputs).logits.double()
    steps = tokens.shape[1]
    logp = torch.log_softmax(logits[:, prompt_len - 1 : prompt_len - 1 + steps], dim=-1)
    return logp.gather(-1, torch.from_numpy(tokens.astype(np.int64))[..., None])[..., 0].numpy()


def train_prompts(cfg: Qwen25VLConfig, rows: slice = slice(None)) -> tuple[PromptBatch, list[list[np.ndarray]]]:
    """The training batch's prompts (rows of SPECS) at the forced LENGTH / WINDOWS, and their pixel arrays."""
    ids, images = prompt_rows(cfg, SPECS, seed=0)
    batch = build_prompt_batch(ids[rows], images[rows], cfg, pad_id=PAD, length=LENGTH, num_windows=WINDOWS)
    return batch, [[px for px, _ in imgs] for imgs in images[rows]]


def completions(rows: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random text tokens and masks with one EOS-like cut per row (lengths 1..T)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 150, (rows, T)).astype(np.int32)
    lengths = np.array([T, 1, 4, T, 2, 5, 3, T][:rows])
    return tokens, (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
