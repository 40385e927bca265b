"""Qwen2-VL's processor: Qwen2.5-VL's (the same image processor, prompts, M-RoPE and host vision layout: images have
one temporal step, so Qwen2-VL's unscaled time axis changes no position) with its own preprocessor_config.json."""

from __future__ import annotations

from typing import Any

from vlmr1_jax.models.qwen2_5_vl.processor import QwenProcessor


class Qwen2VLProcessor(QwenProcessor):
    """The `Processor` of Qwen2-VL (models/processor.py)."""

    def hf_preprocessor_config(self, cfg: Any) -> dict[str, Any]:
        """Qwen2.5-VL's preprocessor_config.json under Qwen2-VL's processor class."""
        return {**super().hf_preprocessor_config(cfg), "processor_class": "Qwen2VLProcessor"}
