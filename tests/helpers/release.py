"""A tiny HF source folder whose model, compact tokenizer and processor agree: what releases are exported from."""

from __future__ import annotations

import copy
from pathlib import Path

from tests.helpers.hf_models import TINY_CONFIG, save_random_hf_model
from vlmr1_jax.processing.tokenizer import build_compact_tokenizer

CORPUS = ["what is in the image", "find the red box", "the answer is 42", "a photo of a cat on a mat"] * 4
PROMPT = "what is in the image?"


def compact_config(tokenizer, base: dict = TINY_CONFIG) -> dict:
    """An HF config dict: `base` with a 320-token vocabulary and the special-token ids of `tokenizer`."""
    config = copy.deepcopy(base)
    config.update(
        vocab_size=320,
        image_token_id=tokenizer.image_pad_id,
        video_token_id=tokenizer.video_pad_id,
        vision_start_token_id=tokenizer.vision_start_id,
        vision_end_token_id=tokenizer.vision_end_id,
        vision_token_id=tokenizer.token_to_id("<|vision_pad|>"),
        bos_token_id=tokenizer.pad_id,
        eos_token_id=tokenizer.eos_ids[0],
    )
    return config


def make_release_source(out: Path, tied: bool = False, seed: int = 0) -> Path:
    """A tiny random HF Qwen2.5-VL (TINY_CONFIG shapes) whose special-token ids are those of a compact
    Qwen2.5-style tokenizer saved beside it, so the processor, the tokenizer and the model agree."""
    tokenizer = build_compact_tokenizer(CORPUS, vocab_size=300)
    save_random_hf_model(out, compact_config(tokenizer), seed=seed, tied=tied)
    tokenizer.save(out)
    return out
