"""InternViT, the vision tower of InternVL: patch embedding, a CLS token and learned absolute positions, then
pre-norm blocks of full attention and an MLP, each branch scaled by a learned per-channel layer scale.

Tiles come in as `pixel_values` [tiles, C, S, S] (channels first, normalised): every tile is one sequence of
1 + (S / patch)^2 tokens and attends to itself only, so tiles are independent rows (sharded like a batch).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmr1_jax.models.internvl.config import VisionConfig
from vlmr1_jax.models.layers import (
    MLP,
    REMAT_POLICIES,
    Dense,
    LayerNorm,
    RMSNorm,
    attention,
    param,
    run_layers,
    stacked,
)
from vlmr1_jax.parallel.mesh import constrain

TILE_AXES = ("batch", "length", "act_embed")  # [tiles, tokens, hidden]
QK_NORM_EPS = 1e-6  # transformers' q / k RMSNorm uses its default eps, not layer_norm_eps
EVERY_KEY = np.ones((1, 1, 1), bool)  # full attention inside a tile: no mask


def _norm(cfg: VisionConfig, param_dtype: jnp.dtype) -> LayerNorm | RMSNorm:
    kind = LayerNorm if cfg.norm_type == "layer_norm" else RMSNorm
    return kind(cfg.hidden_size, cfg.norm_eps, "vision_embed", param_dtype=param_dtype)


def _layer_scale(cfg: VisionConfig, param_dtype: jnp.dtype) -> nnx.Param:
    return nnx.Param(jnp.full((cfg.hidden_size,), cfg.layer_scale_init, param_dtype), logical_axes=("vision_embed",))


class VisionAttention(nnx.Module):
    """Multi-head attention with separate q / k / v projections; with `qk_norm`, RMSNorm over all heads of q and k."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        d = cfg.hidden_size
        kw: dict[str, Any] = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = Dense(d, d, ("vision_embed", "vision_heads"), use_bias=cfg.qkv_bias, **kw)
        self.k = Dense(d, d, ("vision_embed", "vision_heads"), use_bias=cfg.qkv_bias, **kw)
        self.v = Dense(d, d, ("vision_embed", "vision_heads"), use_bias=cfg.qkv_bias, **kw)
        self.proj = Dense(d, d, ("vision_heads", "vision_embed"), use_bias=True, **kw)
        norm = lambda: RMSNorm(d, QK_NORM_EPS, "vision_heads", param_dtype=param_dtype) if cfg.qk_norm else None
        self.q_norm, self.k_norm = norm(), norm()
        self.num_heads = cfg.num_heads

    def __call__(self, x: jax.Array) -> jax.Array:
        tiles, tokens, d = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        heads = lambda t: t.reshape(tiles, tokens, self.num_heads, d // self.num_heads)
        out = attention(heads(q), heads(k), heads(v), jnp.asarray(EVERY_KEY))
        return self.proj(out.reshape(tiles, tokens, d))


class VisionBlock(nnx.Module):
    """x + ls1 * attn(norm1(x)), then + ls2 * mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.norm1 = _norm(cfg, param_dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ls1 = _layer_scale(cfg, param_dtype)
        self.norm2 = _norm(cfg, param_dtype)
        self.mlp = MLP(
            cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        self.ls2 = _layer_scale(cfg, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.ls1[...].astype(x.dtype) * self.attn(self.norm1(x))
        return x + self.ls2[...].astype(x.dtype) * self.mlp(self.norm2(x))


class InternViT(nnx.Module):
    """Tiles -> the hidden state `cfg.feature_layer` [tiles, 1 + patches, hidden] (CLS first). The blocks are one
    `stacked` module, scanned or unrolled (`scan`) and rematerialised per `remat` as the decoder's."""

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
        d = cfg.hidden_size
        # Conv2d with stride == kernel is a matmul over flattened [C, p, p] patches.
        self.patch_embed = Dense(
            cfg.patch_dim, d, (None, "vision_embed"), use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        self.cls_token = param(rngs, (1, 1, d), (None, None, "vision_embed"), "normal", param_dtype)
        self.pos_embed = param(rngs, (1, cfg.grid**2 + 1, d), (None, None, "vision_embed"), "normal", param_dtype)
        self.blocks = stacked(
            lambda r: VisionBlock(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype), cfg.num_layers, rngs
        )

    def patches(self, pixel_values: jax.Array) -> jax.Array:
        """[tiles, C, S, S] -> [tiles, (S/p)^2, C*p*p], patches row-major, each flattened as (C, p, p)."""
        cfg = self.cfg
        want = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; the vision tower takes [tiles, "
                f"{', '.join(map(str, want))}] (channels first, tiles of vision image_size {cfg.image_size})"
            )
        tiles, g, p = pixel_values.shape[0], cfg.grid, cfg.patch_size
        x = pixel_values.reshape(tiles, cfg.in_channels, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
        return x.reshape(tiles, g * g, cfg.patch_dim)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.cfg
        x = self.patch_embed(self.patches(pixel_values).astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (x.shape[0], 1, cfg.hidden_size))
        x = constrain(jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(self.dtype), TILE_AXES)
        # Blocks past the selected hidden state do not run (a static flag per block; all of them for layer -1).
        active = np.arange(cfg.num_layers) < cfg.used_layers

        def body(block: VisionBlock, x, on):
            run = lambda: constrain(block(x), TILE_AXES)
            if on is None or isinstance(on, (bool, np.bool_)):  # every block runs / unrolled: a static choice
                return (run() if on is None or on else x), None
            return jax.lax.cond(on, run, lambda: x), None

        policy = "none" if self.remat == "none" else REMAT_POLICIES[self.remat]
        xs = None if active.all() else active
        x, _ = run_layers(self.blocks, body, x, xs, scan=self.scan, remat_policy=policy)
        return x
