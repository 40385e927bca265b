"""Rotary position math for Qwen2.5-VL: inverse frequencies, sectioned M-RoPE, 2-D vision rope, get_rope_index.

`get_rope_index` follows the reference semantics (Qwen's original code = transformers 4.49 = vLLM), not whichever
transformers is installed: 4.57 truncates fractional `second_per_grid_ts` and 5.x restarts text after a video at
`start + max(h, w) // 2` (docs/facts.md: Position ids). It runs on the host in numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(dim: int, theta: float) -> np.ndarray:
    """`1 / theta ** (arange(0, dim, 2) / dim)` in float32, with torch's operation order."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent, dtype=np.float32)).astype(np.float32)


def mrope_cos_sin(
    positions: jax.Array, inv_freq: np.ndarray, mrope_section: Sequence[int], dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    """Sectioned (non-interleaved) M-RoPE. positions: [3, B, L] int -> cos, sin: [B, L, head_dim] in `dtype`.

    Frequency j keeps its own inv_freq[j]; section i of `mrope_section` takes its position from axis i (T, H, W).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [3, B, L, hd/2]
    bounds = np.cumsum([0, *mrope_section])
    freqs = jnp.concatenate([angles[i, ..., bounds[i] : bounds[i + 1]] for i in range(3)], axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def vision_cos_sin(hw_positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """2-D vision rope. hw_positions: [N, 2] (row, col in patches) -> float32 cos, sin: [N, head_dim]."""
    pos = hw_positions.astype(jnp.float32)
    inv = jnp.asarray(inv_freq)
    freqs = jnp.concatenate([pos[:, :1] * inv, pos[:, 1:] * inv], axis=-1)  # [N, hd/2] = [h-freqs | w-freqs]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def get_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: Sequence[Sequence[int]] = (),
    video_grid_thw: Sequence[Sequence[int]] = (),
    second_per_grid_ts: Sequence[float] | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """3-D M-RoPE positions [3, B, L] (int64) and per-row decode deltas [B] for a (left-)padded batch.

    Vision items are found by scanning `<|vision_start|>` and the token after it; image and video grids are
    consumed in order across the whole batch. Pad positions are set to 1 (4.x convention; they are masked).
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    positions = np.ones((3, batch, length), dtype=np.int64)
    deltas = np.zeros((batch,), dtype=np.int64)
    images, videos = iter(list(image_grid_thw)), iter(list(video_grid_thw))
    video_index = 0
    for b in range(batch):
        tokens = input_ids[b][mask[b]]
        starts = np.flatnonzero(tokens[:-1] == vision_start_token_id)
        kinds = tokens[starts + 1]
        chunks: list[np.ndarray] = []
        cursor, next_pos = 0, 0
        for start, kind in zip(starts, kinds):
            if kind == image_token_id:
                grid, spg = next(images, None), 0.0
                if grid is None:
                    raise ValueError(f"row {b}: more image items in input_ids than image_grid_thw rows")
            elif kind == video_token_id:
                grid = next(videos, None)
                if grid is None:
                    raise ValueError(f"row {b}: more video items in input_ids than video_grid_thw rows")
                spg = 1.0 if second_per_grid_ts is None else float(second_per_grid_ts[video_index])
                video_index += 1
            else:
                continue
            t, h, w = (int(x) for x in grid)
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            item_start = int(start) + 1
            text_len = item_start - cursor
            chunks.append(np.broadcast_to(np.arange(text_len) + next_pos, (3, text_len)))
            next_pos = int(chunks[-1].max()) + 1 if text_len else next_pos
            # float32 multiply in the reference's order, then truncate (images have t = 1, so T = [0]).
            t_idx = (np.arange(t, dtype=np.float32) * np.float32(spg) * np.float32(tokens_per_second)).astype(np.int64)
            grid_pos = np.stack(np.meshgrid(t_idx, np.arange(gh), np.arange(gw), indexing="ij")).reshape(3, -1)
            chunks.append(grid_pos + next_pos)
            next_pos = int(chunks[-1].max()) + 1
            cursor = item_start + t * gh * gw
        tail = len(tokens) - cursor
        if tail > 0:
            chunks.append(np.broadcast_to(np.arange(tail) + next_pos, (3, tail)))
        row = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        if row.shape[1] != len(tokens):
            raise ValueError(f"row {b}: vision tokens do not match the grids ({row.shape[1]} != {len(tokens)})")
        positions[:, b, mask[b]] = row
        deltas[b] = (int(row.max()) + 1 if row.size else 0) - len(tokens)
    return positions, deltas
