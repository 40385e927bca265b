"""The shared prefix of a group: encode each prompt's images and prefill the prompt once, then fan the KV cache out
to its G rows. The sampler decodes from it and the training forward runs the completions on it; causal attention
makes both equal to running every prompt + completion row in full, at P*L instead of P*G*L prompt tokens.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vlmr1_jax.models.family import VisionLanguageModel
from vlmr1_jax.models.processor import vision_inputs


class FannedPrefix(NamedTuple):
    """P prompts fanned out to B = P * G rows (row p*G+g is sample g of prompt p)."""

    logits: jax.Array  # [B, vocab]: the last prompt position's logits, predicting completion token 0
    cache: Any  # [layers, B, L + steps, ...]: the prompt's keys and values, room for `steps` more tokens
    next_position: jax.Array  # [B] int32: M-RoPE position of completion token 0


def prefill(model: VisionLanguageModel, prompts: dict[str, jax.Array], steps: int) -> FannedPrefix:
    """Prefill the P prompts of `prompts` (`PromptBatch.arrays()` on device) once, with their images encoded once,
    into a cache with room for `steps` more tokens per row: the P-row `FannedPrefix` (G = 1)."""
    ids = prompts["input_ids"]
    count, length = ids.shape
    vision = vision_inputs(prompts)
    features = model.encode_vision(vision) if vision else None  # a batch without images needs no vision tower
    cache = model.init_cache(count, length + steps)
    hidden, cache = model(
        ids,
        prompts["positions"],
        prompts["attention_mask"],
        features,
        prompts["vision_gather"],
        cache,
    )
    return FannedPrefix(logits=model.logits(hidden[:, -1]), cache=cache, next_position=prompts["next_position"])


def prefill_fan_out(
    model: VisionLanguageModel, prompts: dict[str, jax.Array], num_samples: int, steps: int
) -> FannedPrefix:
    """`prefill`, with the result repeated to `num_samples` rows per prompt; gradients flow through the repeat."""
    logits, cache, next_position = prefill(model, prompts, steps)
    return FannedPrefix(
        logits=jnp.repeat(logits, num_samples, axis=0),
        cache=cache.repeat(num_samples),
        next_position=jnp.repeat(next_position, num_samples, axis=0),
    )
