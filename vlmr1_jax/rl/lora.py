"""LoRA as VLM-R1 configures it: adapters on every non-vision linear layer, lm_head included (not the embedding).

`lora_b` starts at zero, so the adapted model equals the base; the base (the GRPO reference) is the same state with
the adapters zeroed. `merge_lora` folds `scale * A @ B` into the kernels for export. Adapter-input dropout (PEFT's
`lora_dropout`) is a static rate set here and runs only on a model given keys by `set_lora_dropout_keys`, which a
train step calls on the model it merges; every other forward (sampling, reference, eval) is dropout-free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlmr1_jax.models.layers import Dense, LoRADropoutKey, LoRAParam

# Module paths (dotted, inside Qwen25VL) that get adapters: every text linear and the untied LM head.
TARGET_PREFIX = "text."


def lora_targets(model: nnx.Module) -> list[tuple[str, Dense]]:
    """(path, Dense) for every linear layer outside the vision tower."""
    out = []
    for path, module in nnx.iter_graph(model):
        name = ".".join(str(p) for p in path)
        if isinstance(module, Dense) and name.startswith(TARGET_PREFIX):
            out.append((name, module))
    return out


def apply_lora(model: nnx.Module, rank: int, alpha: float, seed: int = 0, dropout: float = 0.0) -> list[str]:
    """Attach adapters in place (A ~ N(0, 1/rank) like PEFT's default Kaiming-uniform scale, B = 0) with
    adapter-input dropout rate `dropout`; returns the adapted module paths."""
    if rank <= 0:
        raise ValueError(f"lora.rank must be positive, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora.dropout must be in [0, 1), got {dropout}")
    key = jax.random.key(seed)
    names = []
    for i, (name, dense) in enumerate(lora_targets(model)):
        *layers, fan_in, fan_out = dense.kernel.shape  # stacked layers carry a leading [layers] axis
        *lead, in_axis, out_axis = dense.kernel.get_metadata().get("logical_axes") or (None,) * dense.kernel.ndim
        a = jax.random.normal(jax.random.fold_in(key, i), (*layers, fan_in, rank), dense.kernel.dtype)
        dense.lora_a = LoRAParam(a / jnp.sqrt(fan_in), logical_axes=(*lead, in_axis, "lora_rank"))
        dense.lora_b = LoRAParam(
            jnp.zeros((*layers, rank, fan_out), dense.kernel.dtype), logical_axes=(*lead, "lora_rank", out_axis)
        )
        dense.lora_scale = alpha / rank
        dense.lora_dropout = float(dropout)
        names.append(name)
    return names


def set_lora_dropout_keys(model: nnx.Module, key: jax.Array) -> None:
    """Switch adapter dropout on for this model object, in place: adapter i draws its mask from fold_in(key, i).

    Call it inside the train step on the freshly merged model, with a key derived from (seed, state.step), so the
    step stays a pure function of its inputs; the model's graphdef and stored state never hold a key.
    """
    for i, (_, dense) in enumerate(lora_targets(model)):
        if dense.lora_a is not None and dense.lora_dropout > 0.0:
            adapter_key = jax.random.fold_in(key, i)
            if dense.kernel.ndim == 3:  # stacked layers: one key per layer, sliced by the layer loop
                adapter_key = jax.random.split(adapter_key, dense.kernel.shape[0])
            dense.lora_dropout_key = LoRADropoutKey(adapter_key)


def merge_lora(model: nnx.Module) -> None:
    """Fold every adapter into its kernel (kernel += scale * A @ B) and remove it, in place."""
    for _, dense in lora_targets(model):
        if dense.lora_a is None:
            continue
        delta = dense.lora_scale * (dense.lora_a[...] @ dense.lora_b[...])  # type: ignore[index]  # set with lora_a
        dense.kernel[...] = (dense.kernel[...] + delta).astype(dense.kernel.dtype)
        dense.lora_a = dense.lora_b = dense.lora_dropout_key = nnx.data(None)
        dense.lora_scale = dense.lora_dropout = 0.0
