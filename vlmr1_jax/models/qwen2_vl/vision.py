"""Qwen2-VL's vision tower: Qwen2.5-VL's tower (patch embedding, 2-D rotary, the host's padded layout) with
LayerNorm blocks, a QuickGELU fc1/fc2 MLP, full attention within each frame in every block, and a LayerNorm merger.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from vlmr1_jax.models.layers import MLP, LayerNorm
from vlmr1_jax.models.qwen2_5_vl.vision import PatchMerger as Qwen25PatchMerger, VisionAttention, VisionTower
from vlmr1_jax.models.qwen2_vl.config import VisionConfig


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.norm1 = LayerNorm(cfg.hidden_size, cfg.norm_eps, "vision_embed", param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)  # type: ignore[arg-type]
        self.norm2 = LayerNorm(cfg.hidden_size, cfg.norm_eps, "vision_embed", param_dtype=param_dtype)
        self.mlp = MLP(
            cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )

    def __call__(self, x, cos, sin, blocks, mask):
        x = x + self.attn(self.norm1(x), cos, sin, blocks, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(Qwen25PatchMerger):
    """Qwen2.5-VL's merger with a LayerNorm (with bias) in place of its RMSNorm."""

    norm_class = LayerNorm


class Qwen2VisionTower(VisionTower):
    """Qwen2.5-VL's tower with Qwen2-VL's blocks and merger; `cfg.fullatt_block_indexes` lists every block."""

    block_class = VisionBlock
    merger_class = PatchMerger
