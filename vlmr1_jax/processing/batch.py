"""Prompts + images -> the model's host-side inputs: left-padded ids, M-RoPE positions, vision plan and gathers.

Everything here is numpy on the host; lengths and window counts are padded to buckets so the jitted sampler and
train step compile a handful of programs, not one per batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlmr1_jax.models.family import family_of
from vlmr1_jax.processing.vision_plan import plan_vision, vision_gather_indices


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """P left-padded prompts and their images, ready for `jax.device_put`."""

    input_ids: np.ndarray  # [P, L] int32
    attention_mask: np.ndarray  # [P, L] int32
    positions: np.ndarray  # [3, P, L] int32
    next_position: np.ndarray  # [P] int32: M-RoPE position of the first generated token (max + 1)
    pixel_values: np.ndarray  # [windows * slots, patch_dim] float32 (padded window layout)
    hw_positions: np.ndarray  # [windows * slots, 2] int32
    frame_ids: np.ndarray  # [windows * slots] int32
    frame_index: np.ndarray  # [frames, frame_slots] int32
    vision_gather: np.ndarray  # [P, L] int32 row of the tower output per image token, -1 elsewhere
    image_grids: tuple[tuple[tuple[int, int, int], ...], ...]  # per prompt, the grid of each image

    def arrays(self) -> dict[str, np.ndarray]:
        """The device-side fields (everything but the per-prompt grid lists)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "image_grids"}


def length_bucket(n: int, multiple: int = 32) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def build_prompt_batch(
    prompt_ids: Sequence[Sequence[int]],
    images: Sequence[Sequence[tuple[np.ndarray, tuple[int, int, int]]]],
    cfg: Any,
    *,
    pad_id: int,
    length: int | None = None,
    num_windows: int | None = None,
) -> PromptBatch:
    """Expand each `<|image_pad|>` to its t*h*w/4 tokens, left-pad, and plan the vision tower.

    `prompt_ids[p]` holds one image placeholder per image of `images[p]`, a list of (pixel_values, grid_thw) from
    `preprocess_image`. `length` / `num_windows` force the padded sizes (else bucketed).
    """
    if len(prompt_ids) != len(images):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(images)} image lists")
    unit = cfg.vision.merge_unit
    rows: list[list[int]] = []
    for p, (ids, imgs) in enumerate(zip(prompt_ids, images)):
        slots = [i for i, t in enumerate(ids) if t == cfg.image_token_id]
        if len(slots) != len(imgs):
            raise ValueError(f"prompt {p}: {len(slots)} image placeholders but {len(imgs)} images")
        row: list[int] = []
        row_grids = iter(g for _, g in imgs)
        for t in ids:
            row.extend([t] * (int(np.prod(next(row_grids))) // unit) if t == cfg.image_token_id else [t])
        rows.append(row)
    longest = max(map(len, rows))
    length = length_bucket(longest) if length is None else length
    if length < longest:
        raise ValueError(f"prompt of {longest} tokens does not fit the forced length {length}")
    input_ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for p, row in enumerate(rows):
        input_ids[p, length - len(row) :] = row
        mask[p, length - len(row) :] = 1
    all_images = [img for imgs in images for img in imgs]
    grids = [tuple(int(x) for x in g) for _, g in all_images]
    positions, deltas = family_of(cfg).rope_index(
        input_ids,
        mask,
        grids,
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        spatial_merge_size=cfg.vision.spatial_merge_size,
    )
    pixels = (
        np.concatenate([px for px, _ in all_images]) if all_images else np.zeros((0, cfg.vision.patch_dim), np.float32)
    )
    plan = plan_vision(
        pixels,
        grids,
        spatial_merge_size=cfg.vision.spatial_merge_size,
        window_merged=cfg.vision.window_merged,
        num_windows=num_windows,
    )
    gather = vision_gather_indices(
        input_ids,
        plan,
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
        num_image_items=len(grids),
    )
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=mask,
        positions=positions.astype(np.int32),
        next_position=(mask.sum(1) + deltas).astype(np.int32),
        pixel_values=plan.pixel_values,
        hw_positions=plan.hw_positions,
        frame_ids=plan.frame_ids,
        frame_index=plan.frame_index,
        vision_gather=gather,
        image_grids=tuple(tuple(tuple(int(x) for x in g) for _, g in imgs) for imgs in images),  # type: ignore[misc]
    )


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's token ids (one placeholder per image) and its preprocessed images, before batching."""

    ids: list[int]
    images: list[tuple[np.ndarray, tuple[int, int, int]]]  # (pixel_values, grid_thw) per image

    def length(self, merge_unit: int) -> int:
        """Tokens once each image placeholder is expanded to its merged patches."""
        return len(self.ids) - len(self.images) + sum(int(np.prod(g)) // merge_unit for _, g in self.images)


def encode_prompt_text(problem: str, num_images: int, tokenizer, task_type: str | None) -> list[int]:
    """VLM-R1's prompt (images first, templated question, Qwen chat template) as token ids."""
    from vlmr1_jax.processing.prompts import render_prompt

    return tokenizer.encode(render_prompt(tokenizer, problem, num_images, task_type))


def load_prompt_images(
    image_paths: Sequence[str], *, min_pixels: int, max_pixels: int
) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """Read and preprocess one prompt's images (errors name the file)."""
    from vlmr1_jax.processing.image import load_image, preprocess_image

    return [preprocess_image(load_image(p), min_pixels=min_pixels, max_pixels=max_pixels) for p in image_paths]


def encode_prompts(
    problems: Sequence[str],
    image_paths: Sequence[Sequence[str]],
    tokenizer,
    cfg: Any,
    *,
    task_type: str | None,
    min_pixels: int,
    max_pixels: int,
    length: int | None = None,
) -> PromptBatch:
    """VLM-R1 prompts with their images, loaded here, as one batch."""
    ids = [
        encode_prompt_text(problem, len(paths), tokenizer, task_type) for problem, paths in zip(problems, image_paths)
    ]
    images = [load_prompt_images(paths, min_pixels=min_pixels, max_pixels=max_pixels) for paths in image_paths]
    return build_prompt_batch(ids, images, cfg, pad_id=tokenizer.pad_id, length=length)
