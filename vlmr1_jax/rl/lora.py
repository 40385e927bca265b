"""LoRA as VLM-R1 configures it: adapters on every linear layer outside the vision tower (every family's `visual`,
the freeze keyword), lm_head included (not the embedding): the decoder, and a projector outside the tower (InternVL's
`mlp1`, which VLM-R1's vision keyword `vision_model` leaves to LoRA).

A tied model's head is the embedding table used as a linear map (`TiedHead`); it gets its own adapter, as PEFT
wraps a tied lm_head's Linear, and the embedding lookup stays unadapted. `lora_b` starts at zero, so the adapted
model equals the base; the base (the GRPO reference) is the same state with the adapters zeroed. `merge_lora`
folds `scale * A @ B` into the weights for export. Adapter-input dropout (PEFT's `lora_dropout`) is a static rate
set here and runs only on a model given keys by `set_lora_dropout_keys`, which a train step calls on the model it
merges; every other forward (sampling, reference, eval) is dropout-free.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from vlmr1_jax.models.layers import Dense, LoRADropoutKey, LoRALinear, LoRAParam, TiedHead

log = logging.getLogger(__name__)

# Every family's vision tower (the module `train.trainable=freeze_vision` freezes): no adapters inside it.
VISION_PREFIX = "visual."


def lora_targets(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    """(path, module) for every linear map outside the vision tower, the (tied or untied) LM head included."""
    out = []
    for path, module in nnx.iter_graph(model):
        name = ".".join(str(p) for p in path)
        if isinstance(module, LoRALinear) and not name.startswith(VISION_PREFIX):
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
    for i, (name, target) in enumerate(lora_targets(model)):
        shape, axes, dtype = target.weight_spec()
        *layers, fan_in, fan_out = shape  # stacked layers carry a leading [layers] axis
        *lead, in_axis, out_axis = axes
        a = jax.random.normal(jax.random.fold_in(key, i), (*layers, fan_in, rank), dtype)
        target.lora_a = LoRAParam(a / jnp.sqrt(fan_in), logical_axes=(*lead, in_axis, "lora_rank"))
        target.lora_b = LoRAParam(
            jnp.zeros((*layers, rank, fan_out), dtype), logical_axes=(*lead, "lora_rank", out_axis)
        )
        target.lora_scale = alpha / rank
        target.lora_dropout = float(dropout)
        names.append(name)
    return names


def set_lora_dropout_keys(model: nnx.Module, key: jax.Array) -> None:
    """Switch adapter dropout on for this model object, in place: adapter i draws its mask from fold_in(key, i).

    Call it inside the train step on the freshly merged model, with a key derived from (seed, state.step), so the
    step stays a pure function of its inputs; the model's graphdef and stored state never hold a key.
    """
    for i, (_, target) in enumerate(lora_targets(model)):
        if target.lora_a is not None and target.lora_dropout > 0.0:
            adapter_key = jax.random.fold_in(key, i)
            shape = target.weight_spec()[0]
            if len(shape) == 3:  # stacked layers: one key per layer, sliced by the layer loop
                adapter_key = jax.random.split(adapter_key, shape[0])
            target.lora_dropout_key = LoRADropoutKey(adapter_key)


def merge_lora(model: nnx.Module) -> None:
    """Fold every adapter into the weight it adapts (W += scale * A @ B) and remove it, in place.

    A tied head's delta goes into the embedding table it shares, as PEFT's `merge_and_unload` adds it to the tied
    weight: the merged model stays tied and its token embeddings change too, so its logits are not the adapted
    model's (the adapter export, `converters.peft`, reproduces those exactly).
    """
    modules = {".".join(str(p) for p in path): module for path, module in nnx.iter_graph(model)}
    for name, target in lora_targets(model):
        if target.lora_a is None:
            continue
        delta = target.lora_scale * (target.lora_a[...] @ target.lora_b[...])  # type: ignore[index]  # set with lora_a
        if isinstance(target, TiedHead):  # the owner's [vocab, in] table: the head's weight, transposed
            weight, delta = modules[name.rpartition(".")[0]].embed, delta.T
            log.warning(
                "%s: the tied head's adapter is merged into the embedding table it shares (as PEFT's "
                "merge_and_unload does), so the input embeddings move too and the merged model's outputs differ "
                "from the trained model's; `vlmr1 export --lora adapter` reproduces those",
                name,
            )
        else:
            assert isinstance(target, Dense), name
            weight = target.kernel
        weight[...] = (weight[...] + delta).astype(weight.dtype)
        target.lora_a = target.lora_b = target.lora_dropout_key = nnx.data(None)
        target.lora_scale = target.lora_dropout = 0.0
