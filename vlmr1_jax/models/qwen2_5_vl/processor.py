"""Qwen2.5-VL's processor: images -> 14-px patch rows and grid_thw, VLM-R1's Qwen prompt, and prompt batches with
M-RoPE positions and the vision tower's padded window plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from vlmr1_jax.models.processor import ChatTemplater, ProcessedImage, PromptBatch, length_bucket
from vlmr1_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from vlmr1_jax.models.qwen2_5_vl.image import (
    IMAGE_FACTOR,
    IMAGE_MEAN,
    IMAGE_STD,
    MAX_PIXELS,
    MERGE_SIZE,
    MIN_PIXELS,
    PATCH_SIZE,
    preprocess_image,
    smart_resize,
    tokens_for_grid,
)
from vlmr1_jax.models.qwen2_5_vl.prompts import QUESTION_TEMPLATES, build_messages, render_prompt
from vlmr1_jax.models.qwen2_5_vl.rope import get_rope_index
from vlmr1_jax.models.qwen2_5_vl.vision_plan import plan_vision, vision_gather_indices

# Config id field -> token, for every vision token of Qwen's prompts (and vocabulary).
VISION_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "vision_token_id": "<|vision_pad|>",
}


def build_prompt_batch(
    prompt_ids: Sequence[Sequence[int]],
    images: Sequence[Sequence[ProcessedImage]],
    cfg: Qwen25VLConfig,
    *,
    pad_id: int,
    length: int | None = None,
    num_windows: int | None = None,
) -> PromptBatch:
    """Expand each `<|image_pad|>` to its t*h*w/4 tokens, left-pad, and plan the vision tower.

    `prompt_ids[p]` holds one image placeholder per image of `images[p]`, a list of (pixel_values, grid_thw) from
    `preprocess_image`. `length` / `num_windows` force the padded sizes (else bucketed). A batch without images has
    no vision arrays (unless `num_windows` asks for them), so its programs run no vision tower.
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
    positions, deltas = get_rope_index(
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
        vision_gather=gather,
        vision=plan.device_inputs() if all_images or num_windows is not None else {},
        image_grids=tuple(tuple(tuple(int(x) for x in g) for _, g in imgs) for imgs in images),
    )


def hf_model_inputs(batch: PromptBatch) -> dict[str, np.ndarray]:
    """transformers' image inputs of a prompt batch: pixel rows back in the processor's order (image, merged unit
    row-major, patch in the unit; recovered from the planned rows' frame ids and patch positions), `image_grid_thw`,
    and `mm_token_type_ids` (1 on image tokens), without which transformers 5 gives image tokens text positions."""
    grids = [g for row in batch.image_grids for g in row]
    if not grids:
        return {}
    frame_ids = batch.vision["frame_ids"]
    valid = frame_ids >= 0
    row, col = batch.vision["hw_positions"][valid].T
    m = MERGE_SIZE
    order = np.lexsort((col % m, row % m, col // m, row // m, frame_ids[valid]))  # the last key sorts first
    return {
        "pixel_values": batch.vision["pixel_values"][valid][order],
        "image_grid_thw": np.asarray(grids, np.int64),
        "mm_token_type_ids": (batch.vision_gather >= 0).astype(np.int64),
    }


class QwenProcessor:
    """The `Processor` of Qwen2.5-VL (models/processor.py), as VLM-R1's Qwen module prepares inputs."""

    reward_variants: ClassVar[Mapping[str, str]] = MappingProxyType({})  # the rewards as the recipe names them
    question_templates = QUESTION_TEMPLATES
    vision_tokens: ClassVar[Mapping[str, str]] = MappingProxyType(VISION_TOKENS)
    added_tokens: ClassVar[tuple[str, ...]] = ()  # a Qwen2.x tokenizer has every token of Qwen's prompts
    tokenizer_config: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    pad_token_field: ClassVar[str] = "bos_token_id"  # Qwen's configs name <|endoftext|> (the pad) as their BOS
    default_max_pixels: ClassVar[int] = MAX_PIXELS
    rec_eval: ClassVar[Mapping[str, Any]] = MappingProxyType({})  # VLM-R1 evaluates Qwen with its r1 protocol

    def preprocess_image(self, image: Image.Image | np.ndarray, *, min_pixels: int, max_pixels: int) -> ProcessedImage:
        return preprocess_image(image, min_pixels=min_pixels, max_pixels=max_pixels)

    def image_tokens(self, grid: Sequence[int]) -> int:
        return tokens_for_grid(grid)

    def image_grid(self, height: int, width: int, *, min_pixels: int, max_pixels: int) -> tuple[int, ...]:
        h, w = smart_resize(height, width, IMAGE_FACTOR, min_pixels, max_pixels)
        return 1, h // PATCH_SIZE, w // PATCH_SIZE

    def model_frame(self, grid: Sequence[int]) -> tuple[int, int]:
        """Qwen2.5-VL answers in absolute pixels of the resized image: grid_thw's h, w times the 14-px patch."""
        return int(grid[1]) * PATCH_SIZE, int(grid[2]) * PATCH_SIZE

    def hf_preprocessor_config(self, cfg: Qwen25VLConfig) -> dict[str, Any]:
        """transformers' Qwen2.5-VL preprocessor_config.json, with size / resample / rescale_factor so that old
        and new image processors agree."""
        v = cfg.vision
        return {
            "min_pixels": MIN_PIXELS,
            "max_pixels": MAX_PIXELS,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "merge_size": v.spatial_merge_size,
            "image_mean": list(IMAGE_MEAN),
            "image_std": list(IMAGE_STD),
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
            "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
            "resample": 3,  # PIL bicubic
            "rescale_factor": 1 / 255,
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
        }

    def for_config(self, cfg: Qwen25VLConfig) -> QwenProcessor:
        """The same processor for every config (patch and merge sizes are the releases' in every config)."""
        return self

    def preprocessor_problems(self, pre: Mapping[str, Any], cfg: Qwen25VLConfig) -> list[str]:
        """The patch geometry must be the model's, the pixel bounds ordered, mean / std one value per channel."""
        problems = []
        v = cfg.vision
        for key, want in (
            ("patch_size", v.patch_size),
            ("temporal_patch_size", v.temporal_patch_size),
            ("merge_size", v.spatial_merge_size),
        ):
            if pre.get(key) != want:
                problems.append(f"preprocessor_config.json: {key} {pre.get(key)} != config's {want}")
        lo, hi = pre.get("min_pixels"), pre.get("max_pixels")
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 < lo <= hi):
            problems.append(f"preprocessor_config.json: min_pixels {lo} / max_pixels {hi} must be 0 < min <= max")
        for key in ("image_mean", "image_std"):
            if len(pre.get(key) or []) != v.in_channels:
                problems.append(f"preprocessor_config.json: {key} needs {v.in_channels} values")
        return problems

    def prompt_messages(self, problem: str, num_images: int, task_type: str | None) -> list[dict[str, Any]]:
        return build_messages(problem, num_images, task_type)

    def render_prompt(self, tokenizer: ChatTemplater, problem: str, num_images: int, task_type: str | None) -> str:
        return render_prompt(tokenizer, problem, num_images, task_type)

    def build_prompt_batch(
        self,
        prompt_ids: Sequence[Sequence[int]],
        images: Sequence[Sequence[ProcessedImage]],
        cfg: Any,
        *,
        pad_id: int,
        length: int | None = None,
    ) -> PromptBatch:
        return build_prompt_batch(prompt_ids, images, cfg, pad_id=pad_id, length=length)

    def hf_model_inputs(self, batch: PromptBatch) -> dict[str, np.ndarray]:
        return hf_model_inputs(batch)
