"""Parity inputs of the Qwen-VL families built token by token, for what the prompt path cannot give: videos, exact
grids, random pixel rows, and folders without a tokenizer (`ports.parity.make_inputs` renders real prompts)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ports.parity import ParityInputs
from vlmr1_jax.models.processor import PromptBatch
from vlmr1_jax.models.qwen2_5_vl.rope import get_rope_index
from vlmr1_jax.models.qwen2_5_vl.vision_plan import plan_vision, vision_gather_indices

SPECIALS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "vision_token_id",
    "bos_token_id",
    "eos_token_id",
)


def make_inputs(
    cfg,
    image_grids: Sequence[tuple[int, int, int]],
    video_grids: Sequence[tuple[int, int, int]] = (),
    second_per_grid_ts: Sequence[float] = (),
    batch: int = 2,
    steps: int = 4,
    seed: int = 0,
) -> ParityInputs:
    """Random text around `<|vision_start|>` + placeholders + `<|vision_end|>` per item (items go to rows
    round-robin, shorter rows left-padded), random pixel rows. With videos, transformers gets our positions
    (transformers 5 restarts text after a video at another position than the reference); else it computes its own."""
    rng = np.random.default_rng(seed)
    plain = np.setdiff1d(np.arange(min(cfg.text.vocab_size, 151643)), [getattr(cfg, f) for f in SPECIALS])
    text = lambda n: list(rng.choice(plain, n))
    unit = cfg.vision.merge_unit
    rows: list[list[int]] = [text(3 + b) for b in range(batch)]
    items = [(cfg.image_token_id, g) for g in image_grids] + [(cfg.video_token_id, g) for g in video_grids]
    per_row: list[list[tuple[int, tuple[int, int, int]]]] = [[] for _ in range(batch)]
    for i, item in enumerate(items):
        per_row[i % batch].append(item)
    images: list[tuple[int, int, int]] = []
    videos: list[tuple[int, int, int]] = []
    image_rows: list[list[tuple[int, int, int]]] = [[] for _ in range(batch)]
    for b in range(batch):
        for token, grid in per_row[b]:
            n = int(np.prod(grid)) // unit
            rows[b] += [cfg.vision_start_token_id] + [token] * n + [cfg.vision_end_token_id] + text(2 + b)
            (images if token == cfg.image_token_id else videos).append(grid)
            if token == cfg.image_token_id:
                image_rows[b].append(grid)
    length = max(map(len, rows)) + 1
    ids = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :] = row
        mask[b, length - len(row) :] = 1
    spg = [float(s) for s in second_per_grid_ts] or [1.0] * len(video_grids)
    spg = [spg[list(video_grids).index(g)] for g in videos]
    pixels = lambda grids: rng.standard_normal((sum(int(np.prod(g)) for g in grids), cfg.vision.patch_dim)).astype(
        np.float32
    )
    image_pixels, video_pixels = pixels(images), pixels(videos)
    positions, deltas = get_rope_index(
        ids,
        mask,
        images,
        videos,
        spg,
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        spatial_merge_size=cfg.vision.spatial_merge_size,
        tokens_per_second=getattr(cfg.vision, "tokens_per_second", 1.0),
    )
    plan = plan_vision(
        np.concatenate([image_pixels, video_pixels]),
        images + videos,
        spatial_merge_size=cfg.vision.spatial_merge_size,
        window_merged=cfg.vision.window_merged,
    )
    gather = vision_gather_indices(
        ids, plan, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id, num_image_items=len(images)
    )
    prompt = PromptBatch(
        input_ids=ids,
        attention_mask=mask,
        positions=positions.astype(np.int32),
        next_position=(mask.sum(1) + deltas).astype(np.int32),
        vision_gather=gather,
        vision=plan.device_inputs() if images or videos else {},
        image_grids=tuple(tuple(r) for r in image_rows),
    )
    hf = {}
    if images:
        hf |= {"pixel_values": image_pixels, "image_grid_thw": np.asarray(images, np.int64)}
    if videos:
        hf |= {
            "pixel_values_videos": video_pixels,
            "video_grid_thw": np.asarray(videos, np.int64),
            "second_per_grid_ts": np.asarray(spg, np.float32),
        }
    if images or videos:
        hf["mm_token_type_ids"] = ((ids == cfg.image_token_id) + 2 * (ids == cfg.video_token_id)).astype(np.int64)
    decode = rng.choice(plain, (batch, steps))
    return ParityInputs(prompt, hf, decode, positions if videos else None)
