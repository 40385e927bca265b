"""Qwen2-VL's vision tower: Qwen2.5-VL's tower (patch embedding, 2-D rotary, the host's padded layout) with
LayerNorm blocks, a QuickGELU fc1/fc2 MLP, full attention within each frame in every block, and a LayerNorm merger.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlmr1_jax.models.layers import ACTIVATIONS, MLP, Dense, LayerNorm
from vlmr1_jax.models.qwen2_5_vl.vision import VisionAttention, VisionTower
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


class PatchMerger(nnx.Module):
    """LayerNorm, then 2x2 patches concatenated -> Linear -> exact GELU -> Linear to the text width."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        wide = cfg.hidden_size * cfg.merge_unit
        kw: dict[str, Any] = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ln_q = LayerNorm(cfg.hidden_size, cfg.norm_eps, "vision_embed", param_dtype=param_dtype)
        self.fc1 = Dense(wide, wide, ("vision_merge", "vision_mlp"), **kw)
        self.fc2 = Dense(wide, cfg.out_hidden_size, ("vision_mlp", "embed"), **kw)
        self.unit = cfg.merge_unit

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.ln_q(x).reshape(x.shape[0] // self.unit, -1)
        return self.fc2(ACTIVATIONS["gelu"](self.fc1(y)))


class Qwen2VisionTower(VisionTower):
    """Qwen2.5-VL's tower with Qwen2-VL's blocks and merger; `cfg.fullatt_block_indexes` lists every block."""

    block_class = VisionBlock
    merger_class = PatchMerger
