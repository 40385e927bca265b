"""Building blocks shared by the vision tower and the decoder: dense, RMSNorm, gated MLP, masked attention.

Every parameter carries `logical_axes` metadata; `vlmr1_jax.parallel.mesh` maps those names to mesh axes, so the
modules themselves know nothing about devices.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Axes = tuple[str | None, ...]
# Finite mask value: -inf turns fully-masked (pad) rows into NaN, which poisons later layers (docs/facts.md: Masks).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: Axes, init: str, dtype: jnp.dtype) -> nnx.Param:
    """A parameter with its logical axis names; `init` is "normal" (std 0.02), "zeros" or "ones"."""
    if init == "normal":
        assert rngs is not None, "init='normal' needs rngs"
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, logical_axes=axes)


def rescale_kernels_to_fan_in(model: nnx.Module) -> None:
    """Rescale every linear kernel (and the vision patch embedding) of a freshly initialised `model` from
    transformers' std 0.02 to std 1/sqrt(fan_in), in place; the embedding tables keep 0.02.

    0.02 suits widths in the thousands; at the demo's widths (64-512) it makes attention scores and branch outputs
    nearly zero at the start, and a model trained from scratch sits on a long plateau (docs/facts.md: The CPU demo).
    """
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and path and path[-1] in ("kernel", "patch_embed"):
            fan_in = node.shape[-2]  # (in, out), or (layers, in, out) when the layers are stacked
            node.set_value(node.get_value() * (1.0 / (0.02 * fan_in**0.5)))


# Checkpoint name of bf16 matmul outputs: rematerialisation policies see a custom_vjp, not a dot, so the "dots"
# policy (REMAT_POLICIES) saves them by this name.
BF16_MATMUL = "bf16_matmul"


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w for x [..., in] and w [in, out] of one dtype: a plain dot unless bfloat16 (`_bf16_matmul`)."""
    if x.dtype != jnp.bfloat16:
        return jnp.dot(x, w)
    return checkpoint_name(_bf16_matmul(x, w), BF16_MATMUL)


def _row_major_transpose(a: jax.Array) -> jax.Array:
    """a.T [n, m] of a [m, n] as a materialised row-major array. A plain 2-D transpose feeding a dot reaches
    XLA:CPU as a column-major operand, which its bf16 matmul library (YNNPACK) refuses, so XLA upcasts that dot to
    float32; transposing with a unit third axis makes XLA copy the data instead, and the dot stays bf16."""
    rows, cols = a.shape
    return jnp.swapaxes(a.reshape(rows, cols, 1), 0, 1).reshape(cols, rows)


@jax.custom_vjp
def _bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """bf16 x @ w accumulated in float32 and rounded to bf16 once, forward and backward, in the canonical
    [m, k] @ [k, n] form XLA:CPU multiplies natively in bf16 (autodiff's transposed dots would run in float32)."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _bf16_matmul_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _bf16_matmul(x, w), (x, w)


def _bf16_matmul_bwd(residuals: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = residuals
    dx = jnp.dot(g, _row_major_transpose(w), preferred_element_type=jnp.float32).astype(x.dtype)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dw = jnp.dot(_row_major_transpose(x2), g2, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


class LoRAParam(nnx.Variable):
    """Low-rank adapter weights: the only trainable variables of a LoRA run (see `vlmr1_jax.rl.lora`)."""


class LoRADropoutKey(nnx.Variable):
    """PRNG key for one adapter's input dropout; set only on the model a train step builds (`rl.lora`)."""


class LoRALinear(nnx.Module):
    """A linear map LoRA can adapt, as PEFT wraps an nn.Linear: y = base(x) + scale * drop(x) @ lora_a @ lora_b.

    `drop` is PEFT's inverted dropout of rate `lora_dropout` on the adapter input, active only while a
    `lora_dropout_key` is set, so sampling, reference and evaluation forwards are never dropped. Subclasses compute
    `base` and say (`weight_spec`) the [in, out] weight it applies, which sizes the adapter (`vlmr1_jax.rl.lora`).
    """

    dtype: jnp.dtype

    def __init__(self) -> None:
        self.lora_a: LoRAParam | None = nnx.data(None)
        self.lora_b: LoRAParam | None = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout = 0.0
        self.lora_dropout_key: LoRADropoutKey | None = nnx.data(None)

    def weight_spec(self) -> tuple[tuple[int, ...], Axes, jnp.dtype]:
        """Shape ([layers,] in, out), logical axes and dtype of the weight the base map applies."""
        raise NotImplementedError

    def adapter(self, x: jax.Array) -> jax.Array:
        """scale * drop(x) @ lora_a @ lora_b in `self.dtype`; `x` already in `self.dtype` (adapter attached)."""
        assert self.lora_a is not None and self.lora_b is not None
        if self.lora_dropout_key is not None and self.lora_dropout > 0.0:
            keep = jax.random.bernoulli(self.lora_dropout_key[...], 1.0 - self.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0.0).astype(self.dtype)
        low = matmul(x, self.lora_a[...].astype(self.dtype))
        return self.lora_scale * matmul(low, self.lora_b[...].astype(self.dtype))


class Dense(LoRALinear):
    """y = x @ kernel (+ bias) (+ the LoRA term); kernel is [in, out] (torch Linear's transpose)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: Axes,
        *,
        use_bias: bool,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        super().__init__()
        self.kernel = param(rngs, (in_features, out_features), axes, "normal", param_dtype)
        self.bias = param(rngs, (out_features,), axes[1:], "zeros", param_dtype) if use_bias else None
        self.dtype = dtype

    def weight_spec(self) -> tuple[tuple[int, ...], Axes, jnp.dtype]:
        axes = self.kernel.get_metadata().get("logical_axes") or (None,) * self.kernel.ndim
        return tuple(self.kernel.shape), tuple(axes), self.kernel.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = matmul(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            y = y + self.adapter(x)
        return y


class TiedHead(LoRALinear):
    """The LM head of a tied model: float32 logits x @ embed^T, with the owner's `embed` table [vocab, in] passed
    in (the model stores it once), plus the LoRA term when an adapter is attached. PEFT wraps a tied lm_head's
    Linear the same way: the adapter changes the logits, never the embedding lookup. No parameters of its own."""

    def __init__(self, in_features: int, out_features: int, axes: Axes, *, dtype: jnp.dtype, param_dtype: jnp.dtype):
        super().__init__()
        self.shape = (in_features, out_features)
        self.axes = axes
        self.dtype = dtype
        self.param_dtype = param_dtype

    def weight_spec(self) -> tuple[tuple[int, ...], Axes, jnp.dtype]:
        return self.shape, self.axes, self.param_dtype

    def __call__(self, x: jax.Array, embed: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, embed.astype(self.dtype).T, preferred_element_type=jnp.float32)
        if self.lora_a is not None:
            y = y + self.adapter(x).astype(jnp.float32)
        return y


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, then multiply by the plain weight."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis: str | None, *, param_dtype: jnp.dtype = jnp.float32):
        self.scale = param(None, (dim,), (axis,), "ones", param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class LayerNorm(nnx.Module):
    """torch's LayerNorm: mean and (biased) variance over the last axis in fp32, scale and shift, back to the
    input dtype."""

    def __init__(self, dim: int, eps: float, axis: str | None, *, param_dtype: jnp.dtype = jnp.float32):
        self.scale = param(None, (dim,), (axis,), "ones", param_dtype)
        self.bias = param(None, (dim,), (axis,), "zeros", param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): the SwiGLU block of both towers (biases only in the vision tower)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        act: str,
        embed_axis: str,
        mlp_axis: str,
        *,
        use_bias: bool,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        kw: dict[str, Any] = dict(use_bias=use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate = Dense(dim, hidden, (embed_axis, mlp_axis), **kw)
        self.up = Dense(dim, hidden, (embed_axis, mlp_axis), **kw)
        self.down = Dense(hidden, dim, (mlp_axis, embed_axis), **kw)
        self.act = ACTIVATIONS[act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(self.act(self.gate(x)) * self.up(x))


class MLP(nnx.Module):
    """fc2(act(fc1(x))), with biases: the plain two-layer block of Qwen2-VL's and InternViT's vision towers."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        act: str,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        kw: dict[str, Any] = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Dense(dim, hidden, ("vision_embed", "vision_mlp"), **kw)
        self.fc2 = Dense(hidden, dim, ("vision_mlp", "vision_embed"), **kw)
        self.act = ACTIVATIONS[act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


def merge_vision_tokens(
    embeds: jax.Array, vision_features: jax.Array | None, vision_gather: jax.Array | None
) -> jax.Array:
    """Token embeddings [B, L, D] with every position whose `vision_gather` index is >= 0 replaced by that row of
    `vision_features` (the placeholder tokens of a prompt's images); the rest keep their token embedding."""
    if vision_features is None:
        return embeds
    assert vision_gather is not None, "vision_features come with vision_gather"
    picked = jnp.take(vision_features.astype(embeds.dtype), jnp.maximum(vision_gather, 0), axis=0)
    return jnp.where((vision_gather >= 0)[..., None], picked, embeds)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Non-interleaved rotary embedding (the `rotate_half` layout of Qwen2 / Qwen2.5-VL)."""
    return x * cos + rotate_half(x) * sin


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, query_block: int = 512) -> jax.Array:
    """Softmax attention with grouped KV heads; softmax in fp32 with a finite mask.

    q: [B, L, H, d]; k, v: [B, S, KV, d] with H a multiple of KV (query head j reads KV head j // (H/KV));
    mask: boolean, broadcastable to [B, L, S] (True = may attend). Returns [B, L, H, d].
    Queries longer than `query_block` are processed block by block under rematerialisation, so the [L, S] fp32
    scores of long completions are never all alive at once, forward or backward (same result).
    """
    length = q.shape[-3]
    if length <= query_block:
        return attend(q, [(k, v, mask)])
    count = -(-length // query_block)
    pad = count * query_block - length
    mask = jnp.broadcast_to(mask, (*mask.shape[:-2], length, mask.shape[-1]))
    q = jnp.pad(q, [(0, 0)] * (q.ndim - 3) + [(0, pad), (0, 0), (0, 0)])
    mask = jnp.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(0, pad), (0, 0)])
    q_blocks = jnp.moveaxis(q.reshape(*q.shape[:-3], count, query_block, *q.shape[-2:]), -4, 0)
    mask_blocks = jnp.moveaxis(mask.reshape(*mask.shape[:-2], count, query_block, mask.shape[-1]), -3, 0)
    one = jax.checkpoint(lambda qb, mb: attend(qb, [(k, v, mb)]))
    out = jax.lax.map(lambda xs: one(*xs), (q_blocks, mask_blocks))  # [count, ..., block, H, d]
    out = jnp.moveaxis(out, 0, -4).reshape(*q.shape[:-3], count * query_block, *q.shape[-2:])
    return out[..., :length, :, :]


def attend(q: jax.Array, sources: Sequence[tuple[jax.Array, jax.Array, jax.Array]]) -> jax.Array:
    """Softmax attention of q [B, L, H, d] over the keys of all `sources` at once (one softmax, in fp32).

    A source (k, v, mask) has k, v [R, S, KV, d] with B a multiple of R: query row b reads key row b // (B / R), so a
    prompt's keys stored once serve its B / R samples (the grouped decode cache). mask: boolean, broadcastable to
    [B, L, S] (True = may attend). Query head j reads KV head j // (H / KV). Returns [B, L, H, d].
    """
    rows, length, heads, dim = q.shape
    kv_heads = sources[0][0].shape[-2]
    group = heads // kv_heads
    scores = []
    for k, _, mask in sources:
        qg = q.reshape(k.shape[0], rows // k.shape[0], length, kv_heads, group, dim)
        s = jnp.einsum("rnlkgd,rskd->rnkgls", qg, k, preferred_element_type=jnp.float32) * dim**-0.5
        scores.append(jnp.where(mask[:, None, None], s.reshape(rows, kv_heads, group, length, -1), MASK_VALUE))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    ends = np.cumsum([s.shape[-1] for s in scores])
    outs = []
    for (_, v, _), start, end in zip(sources, [0, *ends[:-1]], ends):
        p = probs[..., start:end].astype(v.dtype).reshape(v.shape[0], rows // v.shape[0], kv_heads, group, length, -1)
        outs.append(jnp.einsum("rnkgls,rskd->rnlkgd", p, v).reshape(rows, length, heads, dim))
    return functools.reduce(operator.add, outs)


# Rematerialisation per layer / block: "full" saves only the layer inputs, "dots" also keeps the outputs of weight
# matmuls (batch-free dots), so the backward recomputes attention and element-wise work but no projection.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(BF16_MATMUL),
    ),
}

LAYERS_AXIS = "layers"  # logical name of the leading axis of stacked layer parameters (never sharded)
STACK_SIZE = "stack_size"  # the attribute that marks a `stacked` module: its layer count


def stacked(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` layers built by `make` as ONE module whose parameters carry a leading [count] axis.

    One layout for scanned and unrolled execution (see `run_layers`): converters, LoRA and sharding see a single
    stacked tensor per weight, and building the model traces one layer, not `count`.
    """

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=count)
    def create(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make(layer_rngs)

    module = create(rngs)
    for _, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Variable):
            axes = variable.get_metadata().get("logical_axes") or (None,) * (variable.ndim - 1)
            variable.set_metadata(logical_axes=(LAYERS_AXIS, *axes))
    setattr(module, STACK_SIZE, count)  # marks the stack for `unstack_layers`
    return module


ModelT = TypeVar("ModelT", bound=nnx.Module)


def unstack_layers(model: ModelT) -> ModelT:
    """A copy of `model` whose `stacked` modules are lists of their layers, each layer's weights sliced out here,
    once; `run_layers` runs such a list unrolled.

    For a loop that runs the layers many times (the sampler's decode loop): XLA:CPU copies a slice of a stack before
    each matmul reads it, so running the stack inside the loop copies every weight on every pass.
    """
    view = nnx.merge(*nnx.split(model))
    stacks = [(path, node) for path, node in nnx.iter_graph(view) if getattr(node, STACK_SIZE, None)]
    for path, stack in stacks:
        graphdef, state = nnx.split(stack)
        count = getattr(stack, STACK_SIZE)
        layers = [nnx.merge(graphdef, jax.tree.map(operator.itemgetter(i), state)) for i in range(count)]
        parent: Any = view
        for name in path[:-1]:
            parent = getattr(parent, str(name))
        setattr(parent, str(path[-1]), nnx.List(layers))
    return view


def run_layers(
    layers: nnx.Module | nnx.List,
    body: Callable[..., tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    scan: bool = True,
    remat_policy: Any = "none",
) -> tuple[Any, Any]:
    """Apply a `stacked` module layer by layer: `carry, y_i = body(layer_i, carry, xs[i])`; returns the final
    carry and the stacked y_i.

    scan=True compiles one layer (`jax.lax.scan`), so compile time does not grow with depth; scan=False unrolls a
    Python loop over static slices (same parameters, same results; `xs` slices are then concrete host values).
    `layers` may also be `unstack_layers`' list of layers, always unrolled.
    `remat_policy`: "none" (keep activations), None (save only the layer inputs) or a `jax.checkpoint_policies`.
    """
    if isinstance(layers, nnx.List):
        graphdef, states = nnx.graphdef(layers[0]), [nnx.state(layer) for layer in layers]
    else:
        graphdef, state = nnx.split(layers)

    def one(carry, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), carry, x)

    if remat_policy != "none":
        one = jax.checkpoint(one, policy=remat_policy, prevent_cse=not scan)
    if not isinstance(layers, nnx.List):
        if scan:
            return jax.lax.scan(one, carry, (state, xs))
        states = [jax.tree.map(operator.itemgetter(i), state) for i in range(jax.tree.leaves(state)[0].shape[0])]
    outputs = []
    for i, layer_state in enumerate(states):
        x = None if xs is None else jax.tree.map(operator.itemgetter(i), xs)
        carry, y = one(carry, (layer_state, x))
        outputs.append(y)
    ys = None if outputs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *outputs)
    return carry, ys
