"""Prompts + image files -> one `PromptBatch`, through the model family's processor (models/processor.py).

Everything here is numpy on the host; the family pads lengths and vision arrays to buckets so the jitted sampler and
train step compile a handful of programs, not one per batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from vlmr1_jax.models.family import processor_of
from vlmr1_jax.models.processor import ChatTemplater, ProcessedImage, Processor, PromptBatch
from vlmr1_jax.parallel.mesh import logical_to_spec
from vlmr1_jax.processing.image import load_image


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's token ids (one placeholder per image) and its preprocessed images, before batching."""

    ids: list[int]
    images: list[ProcessedImage]

    def length(self, cfg: Any) -> int:
        """Tokens once each image placeholder is expanded by the family's processor."""
        tokens = processor_of(cfg).image_tokens
        return len(self.ids) - len(self.images) + sum(tokens(g) for _, g in self.images)


def encode_prompt_text(problem: str, num_images: int, tokenizer: Any, cfg: Any, task_type: str | None) -> list[int]:
    """VLM-R1's prompt for the family of `cfg` (images first, templated question, chat template) as token ids."""
    templater: ChatTemplater = tokenizer
    return tokenizer.encode(processor_of(cfg).render_prompt(templater, problem, num_images, task_type))


def load_prompt_images(
    image_paths: Sequence[str], processor: Processor, *, min_pixels: int, max_pixels: int
) -> list[ProcessedImage]:
    """Read and preprocess one prompt's images (errors name the file)."""
    return [
        processor.preprocess_image(load_image(p), min_pixels=min_pixels, max_pixels=max_pixels) for p in image_paths
    ]


def build_prompt_batch(
    encoded: Sequence[EncodedPrompt], cfg: Any, *, pad_id: int, length: int | None = None
) -> PromptBatch:
    """Encoded prompts as one left-padded batch, by the family's processor."""
    return processor_of(cfg).build_prompt_batch(
        [e.ids for e in encoded], [e.images for e in encoded], cfg, pad_id=pad_id, length=length
    )


def encode_prompts(
    problems: Sequence[str],
    image_paths: Sequence[Sequence[str]],
    tokenizer: Any,
    cfg: Any,
    *,
    task_type: str | None,
    min_pixels: int,
    max_pixels: int,
    length: int | None = None,
) -> PromptBatch:
    """VLM-R1 prompts with their images, loaded here, as one batch."""
    processor = processor_of(cfg)
    encoded = [
        EncodedPrompt(
            encode_prompt_text(problem, len(paths), tokenizer, cfg, task_type),
            load_prompt_images(paths, processor, min_pixels=min_pixels, max_pixels=max_pixels),
        )
        for problem, paths in zip(problems, image_paths)
    ]
    return build_prompt_batch(encoded, cfg, pad_id=tokenizer.pad_id, length=length)


def to_device(
    batch: PromptBatch | dict[str, np.ndarray], mesh: Mesh, axes: dict[str, int] | None = None
) -> dict[str, jax.Array]:
    """Global host arrays -> arrays sharded over the batch axes of `mesh` (every process holds the whole global
    batch and contributes its addressable shards, so the same code runs on one host or a pod)."""
    if isinstance(batch, PromptBatch):
        arrays, axes = batch.arrays(), batch.batch_axes()
    else:
        arrays, axes = batch, axes or {}
    out: dict[str, jax.Array] = {}
    for name, value in arrays.items():
        value = np.asarray(value)
        logical: list[str | None] = [None] * value.ndim
        if name in axes:
            logical[axes[name]] = "batch"
        sharding = NamedSharding(mesh, logical_to_spec(logical, value.shape, mesh))
        out[name] = jax.make_array_from_callback(value.shape, sharding, lambda idx, v=value: v[idx])  # type: ignore[misc]
    return out
