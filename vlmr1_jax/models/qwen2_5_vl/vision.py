"""Qwen2.5-VL vision tower: patch embedding, 2-D rotary, window / full attention blocks, patch merger.

Inputs come in the padded window layout of `vision_plan.py` (computed on the host), so window
attention is a reshape to `[windows, slots, D]` and full attention is a mask over frame ids: block-diagonal per
window or per (item, temporal patch), exactly as HF's variable-length attention (docs/facts.md: Vision tower).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmr1_jax.models.layers import (
    ACTIVATIONS,
    REMAT_POLICIES,
    Dense,
    GatedMLP,
    RMSNorm,
    apply_rotary,
    attention,
    param,
    run_layers,
    stacked,
)
from vlmr1_jax.models.qwen2_5_vl.config import VisionConfig
from vlmr1_jax.models.qwen2_5_vl.rope import inv_frequencies, vision_cos_sin
from vlmr1_jax.parallel.mesh import constrain

# Rows of the padded window layout go over the batch mesh axes (whole windows per device when they divide).
ROW_AXES = ("batch", "act_embed")


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        d = cfg.hidden_size
        kw: dict[str, Any] = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.qkv = Dense(d, 3 * d, ("vision_embed", "vision_heads"), **kw)  # out axis = [q | k | v], head-major
        self.proj = Dense(d, d, ("vision_heads", "vision_embed"), **kw)
        self.num_heads = cfg.num_heads

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, blocks: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [N, D]; attention runs inside each row of `blocks` ([G, S] slot indices, N = pad) with mask
        [G, S, S]: the windows, or the frames for full-attention blocks."""
        n, d = x.shape
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # Rotate in fp32 and cast back, as HF's vision path does.
        rot = lambda t: apply_rotary(t.astype(jnp.float32), cos[:, None], sin[:, None]).astype(t.dtype)
        q, k = rot(q), rot(k)
        pad = lambda t: jnp.concatenate([t, jnp.zeros_like(t[:1])])  # row N = padding
        qb, kb, vb = (jnp.take(pad(t), blocks, axis=0) for t in (q, k, v))
        out = attention(qb, kb, vb, mask)
        out = jnp.zeros((n + 1, *out.shape[2:]), out.dtype).at[blocks].set(out)[:n]
        return self.proj(out.reshape(n, d))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.norm_eps, "vision_embed", param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps, "vision_embed", param_dtype=param_dtype)
        self.mlp = GatedMLP(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.hidden_act,
            "vision_embed",
            "vision_mlp",
            use_bias=True,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def __call__(self, x, cos, sin, blocks, mask):
        x = x + self.attn(self.norm1(x), cos, sin, blocks, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """The norm (`norm_class`: RMSNorm here, Qwen2-VL's LayerNorm), then 2x2 patches concatenated -> Linear -> exact
    GELU -> Linear to the text width."""

    norm_class: Callable[..., nnx.Module] = RMSNorm

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        wide = cfg.hidden_size * cfg.merge_unit
        kw: dict[str, Any] = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ln_q = self.norm_class(cfg.hidden_size, cfg.norm_eps, "vision_embed", param_dtype=param_dtype)
        self.fc1 = Dense(wide, wide, ("vision_merge", "vision_mlp"), **kw)
        self.fc2 = Dense(wide, cfg.out_hidden_size, ("vision_mlp", "embed"), **kw)
        self.unit = cfg.merge_unit

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.ln_q(x).reshape(x.shape[0] // self.unit, -1)
        return self.fc2(ACTIVATIONS["gelu"](self.fc1(y)))


class VisionTower(nnx.Module):
    """Patch embedding, the blocks as one `stacked` module (scanned or unrolled, see `run_layers`), the merger.
    `remat` ("none" | "full" | "dots") rematerialises each block in the backward pass, as in the decoder. A variant
    family (Qwen2-VL) swaps in its own `block_class` / `merger_class`."""

    block_class: Callable[..., nnx.Module] = VisionBlock
    merger_class: Callable[..., nnx.Module] = PatchMerger

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        scan: bool = True,
        remat: str = "none",
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.scan = scan
        self.remat = remat
        # Conv3d with stride == kernel and no bias is a matmul over flattened [C, Tp, p, p] rows.
        self.patch_embed = param(rngs, (cfg.patch_dim, cfg.hidden_size), (None, "vision_embed"), "normal", param_dtype)
        block, merger = self.block_class, self.merger_class
        self.blocks = stacked(lambda r: block(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype), cfg.depth, rngs)
        self.merger = merger(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(
        self, pixel_values: jax.Array, hw_positions: jax.Array, frame_ids: jax.Array, frame_index: jax.Array
    ) -> jax.Array:
        """Padded window layout in (see `plan_vision`), merged tokens out: [N / 4, out_hidden] in the same layout.

        Window blocks attend inside each window (a reshape); full blocks inside each frame (`frame_index` rows),
        so the cost is per window / per frame, never quadratic in the whole batch.
        """
        cfg = self.cfg
        n = pixel_values.shape[0]
        slots = cfg.window_patches
        x = constrain(jnp.dot(pixel_values.astype(self.dtype), self.patch_embed[...].astype(self.dtype)), ROW_AXES)
        cos, sin = vision_cos_sin(hw_positions, inv_frequencies(cfg.head_dim // 2, cfg.rope_theta))
        valid = jnp.concatenate([frame_ids >= 0, jnp.zeros((1,), bool)])  # row N: padding
        window_index = jnp.arange(n).reshape(n // slots, slots)
        groups = {False: window_index, True: frame_index}
        masks = {}
        for full, index in groups.items():
            ok = valid[index]
            masks[full] = ok[:, :, None] & ok[:, None, :]
        # Indexes past the depth mean "no full attention there", as in transformers.
        full_blocks = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)
        uniform = bool(full_blocks.all() or not full_blocks.any())  # one kind of block: no branch to compile

        def body(block: VisionBlock, x, full):
            run = lambda f: constrain(block(x, cos, sin, groups[f], masks[f]), ROW_AXES)
            if uniform or isinstance(full, (bool, np.bool_)):  # a static choice (unrolled, or one kind)
                return run(bool(full_blocks[0])) if uniform else run(bool(full)), None
            return jax.lax.cond(full, lambda: run(True), lambda: run(False)), None

        policy = "none" if self.remat == "none" else REMAT_POLICIES[self.remat]
        x, _ = run_layers(self.blocks, body, x, full_blocks, scan=self.scan, remat_policy=policy)
        return self.merger(x)
