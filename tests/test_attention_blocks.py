"""Query-blocked attention (long completions, large frames) equals a numpy softmax attention written from the
formula, values and gradients, including a padded last block and grouped KV heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmr1_jax.models.layers import attention


def numpy_attention(q, k, v, mask):
    """float64 softmax(q k^T / sqrt(d) | mask) v per query head, KV head j // (H / KV)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    heads, kv_heads, dim = q.shape[-2], k.shape[-2], q.shape[-1]
    k = np.repeat(k, heads // kv_heads, axis=-2)
    v = np.repeat(v, heads // kv_heads, axis=-2)
    scores = np.einsum("...lhd,...shd->...hls", q, k) / np.sqrt(dim)
    scores = np.where(np.asarray(mask)[..., None, :, :], scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("...hls,...shd->...lhd", probs, v)


@pytest.mark.parametrize("block", [8, 37, 512])
def test_blocked_attention_matches_formula_and_gradients(block):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, 37, 4, 8))
    k = jax.random.normal(keys[1], (2, 45, 2, 8))
    v = jax.random.normal(keys[2], (2, 45, 2, 8))
    mask = jax.random.bernoulli(keys[3], 0.7, (2, 37, 45)).at[..., 0].set(True)
    np.testing.assert_allclose(
        attention(q, k, v, mask, query_block=block), numpy_attention(q, k, v, mask), atol=2e-6, rtol=0
    )
    loss = lambda block: lambda *t: (attention(*t, mask, query_block=block) ** 2).sum()
    blocked = jax.grad(loss(block), argnums=(0, 1, 2))(q, k, v)
    whole = jax.grad(loss(10_000), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(blocked, whole):
        np.testing.assert_allclose(a, b, atol=5e-6, rtol=0)
    assert float(jnp.abs(whole[0]).max()) > 1e-3
