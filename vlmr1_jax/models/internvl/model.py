"""InternVL for conditional generation: InternViT, pixel shuffle, the MLP projector and a Qwen2 decoder.

Each tile becomes (S / patch * downsample_ratio)^2 visual tokens (256 for 448-pixel tiles): the selected hidden
state without its CLS token, each 2x2 patch neighbourhood concatenated into one vector (transformers' channel
order), then LayerNorm -> Linear -> GELU -> Linear to the decoder width. The host passes `vision_gather` [B, L]:
for each <IMG_CONTEXT> token, its row of `encode_vision`'s output (the tokens of all tiles in order, i.e. HF's
row-major `masked_scatter`), -1 elsewhere; rows of a prompt's G samples gather the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vlmr1_jax.models.family import VisionLanguageModel
from vlmr1_jax.models.internvl.config import InternVLConfig
from vlmr1_jax.models.internvl.vision import TILE_AXES, InternViT
from vlmr1_jax.models.layers import ACTIVATIONS, REMAT_POLICIES, Dense, LayerNorm, merge_vision_tokens
from vlmr1_jax.models.qwen2_5_vl.text import KVCache, TextModel
from vlmr1_jax.parallel.mesh import constrain

PROJECTOR_NORM_EPS = 1e-5  # torch's LayerNorm default, which both the original and transformers' projector use


def pixel_shuffle(x: jax.Array, side: int) -> jax.Array:
    """[tiles, G*G, C] patch rows -> [tiles, (G/side)^2, side^2 * C]: token (a, b) concatenates the patches
    (a*side + j, b*side + k) in (j, k) order, as transformers' `pixel_shuffle` (the original's "v2") orders them."""
    tiles, patches, channels = x.shape
    grid = round(patches**0.5)
    out = grid // side
    x = x.reshape(tiles, out, side, out, side, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(tiles, out * out, side * side * channels)


class Projector(nnx.Module):
    """LayerNorm -> Linear -> act -> Linear from the shuffled vision width to the decoder width (`mlp1`)."""

    def __init__(self, cfg: InternVLConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        wide, out = cfg.vision.hidden_size * cfg.shuffle**2, cfg.text.hidden_size
        kw: dict[str, Any] = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = LayerNorm(wide, PROJECTOR_NORM_EPS, "vision_merge", param_dtype=param_dtype)
        self.fc1 = Dense(wide, out, ("vision_merge", "mlp"), **kw)
        self.fc2 = Dense(out, out, ("mlp", "embed"), **kw)
        self.act = ACTIVATIONS[cfg.projector_hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class InternVL(VisionLanguageModel):
    def __init__(
        self,
        cfg: InternVLConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: str = "none",
        scan_layers: bool = True,
    ):
        self.cfg = cfg
        self.visual = InternViT(
            cfg.vision, rngs=rngs, dtype=dtype, param_dtype=param_dtype, scan=scan_layers, remat=remat
        )
        self.projector = Projector(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.text = TextModel(cfg.text, rngs=rngs, dtype=dtype, param_dtype=param_dtype, remat=remat, scan=scan_layers)

    def set_scan_layers(self, scan: bool) -> None:
        """Scan (one compiled layer) or unroll the vision blocks and decoder layers; parameters are unchanged."""
        self.visual.scan = self.text.scan = scan

    def set_remat(self, remat: str) -> None:
        """Rematerialise each vision block and decoder layer in the backward ("none" | "full" | "dots")."""
        if remat != "none" and remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={remat!r}; choose none, {', '.join(REMAT_POLICIES)}")
        self.visual.remat = self.text.remat = remat

    def encode_vision(self, inputs: Mapping[str, jax.Array]) -> jax.Array:
        """`pixel_values` [tiles, C, S, S] -> visual tokens [tiles * num_image_token, text hidden], tile by tile."""
        if "pixel_values" not in inputs:
            raise ValueError(f"InternVL's vision inputs are `pixel_values` [tiles, C, S, S]; got {sorted(inputs)}")
        hidden = self.visual(inputs["pixel_values"])[:, 1:]  # the CLS token carries no patch
        tokens = constrain(self.projector(pixel_shuffle(hidden, self.cfg.shuffle)), TILE_AXES)
        return tokens.reshape(-1, tokens.shape[-1])

    def embed(
        self, input_ids: jax.Array, vision_features: jax.Array | None = None, vision_gather: jax.Array | None = None
    ) -> jax.Array:
        """Token embeddings with each <IMG_CONTEXT> position replaced by its visual token."""
        return merge_vision_tokens(self.text.embed_tokens(input_ids), vision_features, vision_gather)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        vision_features: jax.Array | None = None,
        vision_gather: jax.Array | None = None,
        cache: Any = None,
    ) -> tuple[jax.Array, Any]:
        """Hidden states after the final norm (call `logits` on the positions you need) and the updated cache.
        positions: [3, B, L] with three equal rows (1-D RoPE)."""
        return self.text(self.embed(input_ids, vision_features, vision_gather), positions, attention_mask, cache)

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache for `batch` rows of up to `length` tokens, in the compute dtype."""
        return KVCache.empty(self.cfg.text, batch, length, self.text.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.text.logits(hidden)
