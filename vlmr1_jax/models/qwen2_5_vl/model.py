"""Qwen2.5-VL for conditional generation: vision tower + Qwen2 decoder, with visual tokens gathered into the text.

The host passes `vision_gather` [B, L]: for each image/video placeholder token, the row of the tower's output that
belongs there (HF's row-major `masked_scatter`, precomputed), and -1 elsewhere. Several text rows may gather the
same features, so a prompt's images are encoded once and shared by its G sampled rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlmr1_jax.models.family import VisionLanguageModel
from vlmr1_jax.models.layers import REMAT_POLICIES, merge_vision_tokens
from vlmr1_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from vlmr1_jax.models.qwen2_5_vl.text import KVCache, TextModel
from vlmr1_jax.models.qwen2_5_vl.vision import VisionTower


class Qwen25VL(VisionLanguageModel):
    vision_tower_class: type[VisionTower] = VisionTower  # a variant family (Qwen2-VL) swaps in its own tower

    def __init__(
        self,
        cfg: Qwen25VLConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: str = "none",
        scan_layers: bool = True,
    ):
        self.cfg = cfg
        self.visual = self.vision_tower_class(
            cfg.vision, rngs=rngs, dtype=dtype, param_dtype=param_dtype, scan=scan_layers, remat=remat
        )
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
        """Merged visual tokens [N/4, D] in the plan's padded window layout (see `plan_vision`)."""
        return self.visual(inputs["pixel_values"], inputs["hw_positions"], inputs["frame_ids"], inputs["frame_index"])

    def embed(
        self, input_ids: jax.Array, vision_features: jax.Array | None = None, vision_gather: jax.Array | None = None
    ) -> jax.Array:
        return merge_vision_tokens(self.text.embed_tokens(input_ids), vision_features, vision_gather)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        vision_features: jax.Array | None = None,
        vision_gather: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Hidden states after the final norm (call `logits` on the positions you need) and the updated cache."""
        embeds = self.embed(input_ids, vision_features, vision_gather)
        return self.text(embeds, positions, attention_mask, cache)

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache for `batch` rows of up to `length` tokens, in the compute dtype."""
        return KVCache.empty(self.cfg.text, batch, length, self.text.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.text.logits(hidden)
