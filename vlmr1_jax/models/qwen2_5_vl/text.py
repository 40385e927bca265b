"""Qwen2 decoder with sectioned M-RoPE, GQA, q/k/v biases and an optional KV cache for incremental decoding."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vlmr1_jax.models.layers import (
    REMAT_POLICIES,
    Dense,
    GatedMLP,
    RMSNorm,
    TiedHead,
    apply_rotary,
    attend,
    attention,
    param,
    run_layers,
    stacked,
)
from vlmr1_jax.models.qwen2_5_vl.config import TextConfig
from vlmr1_jax.models.qwen2_5_vl.rope import inv_frequencies, mrope_cos_sin
from vlmr1_jax.parallel.mesh import constrain

HIDDEN_AXES = ("batch", "length", "act_embed")  # the residual stream between decoder layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys (stored after rotation, as HF) and values per layer, which slots hold valid tokens, and the write index.

    k, v: [layers, B, S, KV, head_dim]; valid: [B, S] bool; index: int32 scalar (next slot to write).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    AXES = ("layers", "batch", "length", "kv_heads", None)  # logical axes of k and v

    @classmethod
    def empty(cls, cfg: TextConfig, batch: int, size: int, dtype: jnp.dtype) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, size, cfg.num_key_value_heads, cfg.head_dim)
        return cls(
            constrain(jnp.zeros(shape, dtype), cls.AXES),
            constrain(jnp.zeros(shape, dtype), cls.AXES),
            jnp.zeros((batch, size), bool),
            jnp.zeros((), jnp.int32),
        )

    def repeat(self, times: int) -> KVCache:
        """Fan each row out to `times` consecutive rows (prefill once, sample G completions)."""
        rep = lambda x: constrain(jnp.repeat(x, times, axis=1), self.AXES)
        return KVCache(rep(self.k), rep(self.v), jnp.repeat(self.valid, times, axis=0), self.index)

    def share(self, times: int, steps: int) -> GroupCache:
        """The decode cache of `times` samples per row, with room for `steps` tokens each; every slot of this
        cache must be written (a prefill sized to its prompts)."""
        rows = self.valid.shape[0] * times
        layers, _, _, kv_heads, head_dim = self.k.shape
        own = (layers, rows, kv_heads, steps, head_dim)
        head_major = lambda x: constrain(x.swapaxes(2, 3), GroupCache.AXES)
        return GroupCache(
            head_major(self.k),
            head_major(self.v),
            self.valid,
            constrain(jnp.zeros(own, self.k.dtype), GroupCache.AXES),
            constrain(jnp.zeros(own, self.v.dtype), GroupCache.AXES),
            jnp.zeros((rows, steps), bool),
            jnp.zeros((), jnp.int32),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GroupCache:
    """The decode cache of G samples per prompt: each prompt's keys and values stored once and read by its G rows
    (row p*G+g is sample g of prompt p), and every row's own keys and values of the tokens it generated.

    Decoding reads P*L + B*T cached keys per layer instead of B*(L+T), and writes only the new tokens' slots.
    Keys and values are stored head-major, the layout attention's batched matmuls read (no transposed copy per step):
    prefix_k, prefix_v: [layers, P, KV, L, head_dim]; prefix_valid: [P, L]; k, v: [layers, B, KV, T, head_dim];
    valid: [B, T]; index: int32 scalar (next own slot to write).
    """

    AXES = ("layers", "batch", "kv_heads", "length", None)  # logical axes of the keys and values

    prefix_k: jax.Array
    prefix_v: jax.Array
    prefix_valid: jax.Array
    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array


class GroupLayer(NamedTuple):
    """One decoder layer's slice of a `GroupCache`."""

    prefix_k: jax.Array
    prefix_v: jax.Array
    k: jax.Array
    v: jax.Array


class TextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        d, hd = cfg.hidden_size, cfg.head_dim
        kw: dict[str, Any] = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = Dense(d, cfg.num_attention_heads * hd, ("embed", "heads"), use_bias=True, **kw)
        self.k = Dense(d, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), use_bias=True, **kw)
        self.v = Dense(d, cfg.num_key_value_heads * hd, ("embed", "kv_heads"), use_bias=True, **kw)
        self.o = Dense(cfg.num_attention_heads * hd, d, ("heads", "embed"), use_bias=False, **kw)
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd

    def __call__(self, x, cos, sin, mask, layer_cache):
        """layer_cache: None, (k, v, index) of a `KVCache` layer (returns the layer with the new tokens written), or
        a `GroupLayer` with `mask` = the masks of its prefix, its own slots and the new tokens (returns the new
        tokens' keys and values only: the caller writes them, so no layer is copied)."""
        b, length, _ = x.shape
        q = self.q(x).reshape(b, length, self.heads, self.head_dim)
        k = self.k(x).reshape(b, length, self.kv_heads, self.head_dim)
        v = self.v(x).reshape(b, length, self.kv_heads, self.head_dim)
        q = constrain(apply_rotary(q, cos[:, :, None], sin[:, :, None]), ("batch", "length", "heads", None))
        k = apply_rotary(k, cos[:, :, None], sin[:, :, None])
        if isinstance(layer_cache, GroupLayer):
            prefix_k, prefix_v, own_k, own_v = (t.astype(q.dtype).swapaxes(1, 2) for t in layer_cache)
            sources = [(prefix_k, prefix_v, mask[0]), (own_k, own_v, mask[1]), (k, v, mask[2])]
            return self.o(attend(q, sources).reshape(b, length, -1)), (k, v)
        if layer_cache is not None:
            ck, cv, index = layer_cache
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
        k, v = (constrain(t, ("batch", "length", "kv_heads", None)) for t in (k, v))
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        return self.o(out.reshape(b, length, -1)), (k, v)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", param_dtype=param_dtype)
        self.attn = TextAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", param_dtype=param_dtype)
        self.mlp = GatedMLP(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.hidden_act,
            "embed",
            "mlp",
            use_bias=False,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def __call__(self, x, cos, sin, mask, layer_cache):
        h, kv = self.attn(self.input_norm(x), cos, sin, mask, layer_cache)
        x = x + h
        return x + self.mlp(self.post_norm(x)), kv


class TextModel(nnx.Module):
    """Token embedding, decoder layers, final norm and the LM head (tied to the embedding when configured).

    The decoder layers are one `stacked` module (parameters [layers, ...]); `scan` runs them with `jax.lax.scan`
    (compile time independent of depth) or unrolled. `remat` ("none" | "full" | "dots") rematerialises each decoder
    layer in the backward pass (REMAT_POLICIES). These and `logits_chunk` are static settings of the compiled program.
    """

    def __init__(
        self,
        cfg: TextConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: str = "none",
        scan: bool = True,
        logits_chunk: int = 256,
    ):
        if remat != "none" and remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={remat!r}; choose none, {', '.join(REMAT_POLICIES)}")
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.scan = scan
        self.logits_chunk = logits_chunk  # positions per training log-prob chunk (rl.step.chunked_logprobs)
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), "normal", param_dtype)
        self.layers = stacked(
            lambda r: DecoderLayer(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype), cfg.num_hidden_layers, rngs
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed", param_dtype=param_dtype)
        head_axes = ("embed", "vocab")
        self.lm_head: Dense | TiedHead = (
            TiedHead(cfg.hidden_size, cfg.vocab_size, head_axes, dtype=dtype, param_dtype=param_dtype)
            if cfg.tie_word_embeddings
            else Dense(
                cfg.hidden_size,
                cfg.vocab_size,
                head_axes,
                use_bias=False,
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
            )
        )

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)

    def __call__(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        cache: KVCache | GroupCache | None = None,
    ) -> tuple[jax.Array, KVCache | GroupCache | None]:
        """embeds: [B, L, D]; positions: [3, B, L] M-RoPE ids; attention_mask: [B, L] (1 = real token).

        Without a cache: causal attention over the L tokens. With a cache: the L tokens are written at
        `cache.index` and attend to every valid earlier slot (of their prompt's prefix too, for a `GroupCache`).
        Returns final-norm hidden states and the new cache.
        """
        cfg = self.cfg
        length = embeds.shape[1]
        cos, sin = mrope_cos_sin(
            positions, inv_frequencies(cfg.head_dim, cfg.rope_theta), cfg.mrope_section, self.dtype
        )
        valid = attention_mask.astype(bool)
        causal = jnp.tril(jnp.ones((length, length), bool))
        if isinstance(cache, GroupCache):
            return self._decode_group(embeds, cos, sin, causal[None] & valid[:, None, :], valid, cache)
        if cache is None:
            mask = causal[None] & valid[:, None, :]
        else:
            size = cache.valid.shape[1]
            key_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
            query_slot = cache.index + jnp.arange(length)
            slot_causal = jnp.arange(size)[None, :] <= query_slot[:, None]
            mask = slot_causal[None] & key_valid[:, None, :]

        def body(layer: DecoderLayer, x, layer_cache):
            layer_cache = None if layer_cache is None else (*layer_cache, cache.index)  # type: ignore[union-attr]
            x, kv = layer(x, cos, sin, mask, layer_cache)
            return constrain(x, HIDDEN_AXES), (None if cache is None else kv)

        per_layer_cache = None if cache is None else (cache.k, cache.v)
        x, kv = self._layers(embeds, body, per_layer_cache)
        if cache is None:
            return x, None
        return x, KVCache(kv[0], kv[1], key_valid, cache.index + length)

    def _decode_group(self, embeds, cos, sin, new_mask, valid, cache: GroupCache) -> tuple[jax.Array, GroupCache]:
        """The L new tokens attend to their prompt's prefix, their row's earlier tokens and each other; their keys
        and values are written into the cache once, after the layers."""
        group = embeds.shape[0] // cache.prefix_valid.shape[0]
        masks = (jnp.repeat(cache.prefix_valid, group, axis=0)[:, None, :], cache.valid[:, None, :], new_mask)

        def body(layer: DecoderLayer, x, layer_cache):
            x, kv = layer(x, cos, sin, masks, GroupLayer(*layer_cache))
            return constrain(x, HIDDEN_AXES), kv

        x, kv = self._layers(embeds, body, (cache.prefix_k, cache.prefix_v, cache.k, cache.v))
        write = lambda old, new: jax.lax.dynamic_update_slice(
            old, new.astype(old.dtype).swapaxes(2, 3), (0, 0, 0, cache.index, 0)
        )
        return x, dataclasses.replace(
            cache,
            k=write(cache.k, kv[0]),
            v=write(cache.v, kv[1]),
            valid=jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index)),
            index=cache.index + embeds.shape[1],
        )

    def _layers(self, embeds: jax.Array, body, per_layer: Any) -> tuple[jax.Array, Any]:
        """Run the decoder layers (scanned or not, rematerialised per `remat`), then the final norm."""
        policy = "none" if self.remat == "none" else REMAT_POLICIES[self.remat]
        x, ys = run_layers(
            self.layers, body, constrain(embeds, HIDDEN_AXES), per_layer, scan=self.scan, remat_policy=policy
        )
        return self.norm(x), ys

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM head in float32 logits (a LoRA adapter on it applies); tied heads reuse the embedding matrix."""
        axes = ("batch", "length", "vocab") if hidden.ndim == 3 else ("batch", "vocab")
        if isinstance(self.lm_head, TiedHead):
            logits = self.lm_head(hidden, self.embed[...])
        else:
            logits = self.lm_head(hidden).astype(jnp.float32)
        return constrain(logits, axes)
