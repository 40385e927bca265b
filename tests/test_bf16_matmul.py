"""bf16 matmuls (`layers.matmul`): values and gradients against the float64 formula, float32 left a plain dot, the
compiled backward multiplying in bf16 on XLA:CPU (not upcast to float32), and the "dots" remat policy keeping them."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlmr1_jax.models.layers import REMAT_POLICIES, Dense, matmul

BF16_EPS = 2.0**-8  # one rounding of a bf16 result


def bf16_inputs(seed: int = 0) -> tuple[jax.Array, jax.Array, np.ndarray]:
    """x [2, 5, 24], w [24, 16] in bf16 and a float64 cotangent [2, 5, 16]."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((24, 16)), jnp.bfloat16)
    return x, w, rng.standard_normal((2, 5, 16))


def relative_error(a, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_bf16_matmul_value_and_gradients_match_the_formula():
    x, w, cot = bf16_inputs()
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    y, pullback = jax.vjp(matmul, x, w)
    dx, dw = pullback(jnp.asarray(cot, jnp.bfloat16))
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    cot16 = np.asarray(jnp.asarray(cot, jnp.bfloat16), np.float64)  # the cotangent as the backward receives it
    assert relative_error(y, x64 @ w64) <= BF16_EPS
    assert relative_error(dx, cot16 @ w64.T) <= BF16_EPS
    assert relative_error(dw, x64.reshape(-1, 24).T @ cot16.reshape(-1, 16)) <= BF16_EPS


def test_float32_matmul_is_a_plain_dot():
    x, w, _ = bf16_inputs()
    jaxpr = jax.make_jaxpr(jax.grad(lambda w: matmul(x.astype(jnp.float32), w).sum()))(w.astype(jnp.float32))
    assert {e.primitive.name for e in jaxpr.jaxpr.eqns} >= {"dot_general"}
    assert not any("custom" in e.primitive.name for e in jaxpr.jaxpr.eqns)


def dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in an optimized HLO module's text."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    types.update(re.findall(r"[(,] ?([\w.\-]+): (\w+)\[", hlo))  # computation parameters
    return [(types[a], types[b]) for a, b in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's bf16 dot support is what is checked")
def test_bf16_dense_forward_and_backward_multiply_in_bf16_on_cpu():
    """Two bf16-compute Dense layers with float32 weights: every dot of the compiled gradient takes bf16 operands.
    Autodiff's own transposed dots would be upcast to float32 by XLA:CPU (no faster than a float32 model)."""
    kw: dict = dict(use_bias=True, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    first = Dense(64, 96, ("embed", "mlp"), rngs=nnx.Rngs(0), **kw)
    second = Dense(96, 64, ("mlp", "embed"), rngs=nnx.Rngs(1), **kw)
    graphdef, params = nnx.split((first, second))
    x = jnp.ones((4, 32, 64), jnp.float32)

    def loss(params):
        a, b = nnx.merge(graphdef, params)
        return jnp.sum(b(jax.nn.silu(a(x))).astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    dots = dot_operand_dtypes(hlo)
    assert len(dots) >= 5  # 2 forward, 3 backward (the input's own gradient is not needed)
    assert set(dots) == {("bf16", "bf16")}, dots


def count_dots(jaxpr) -> int:
    found = 0
    for eqn in jaxpr.eqns:
        found += eqn.primitive.name == "dot_general"
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += count_dots(inner)
    return found


def test_dots_policy_saves_bf16_matmul_outputs():
    """The "dots" policy recomputes no projection in bf16 either: as many dots as without rematerialisation."""
    x, w, _ = bf16_inputs()
    w2 = w.T

    def layer(x, w, w2):
        return matmul(jax.nn.silu(matmul(x, w)), w2)

    def dots(fn) -> int:
        loss = lambda w, w2: jnp.sum(fn(x, w, w2).astype(jnp.float32))
        return count_dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(w, w2).jaxpr)

    assert dots(jax.checkpoint(layer, policy=REMAT_POLICIES["dots"])) == dots(layer)
    assert dots(jax.checkpoint(layer, policy=REMAT_POLICIES["full"])) > dots(layer)
