"""Qwen2-VL for conditional generation: Qwen2.5-VL's model (Qwen2 decoder, M-RoPE, gathered visual tokens) with
Qwen2-VL's vision tower."""

from __future__ import annotations

from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL
from vlmr1_jax.models.qwen2_vl.vision import Qwen2VisionTower


class Qwen2VL(Qwen25VL):
    vision_tower_class = Qwen2VisionTower
