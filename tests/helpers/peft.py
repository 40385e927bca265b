"""What the LoRA export tests compare: random non-zero adapters, our jitted logits, and transformers' logits on the
same parity inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ports.parity import ParityInputs
from vlmr1_jax.rl.lora import lora_targets


def random_adapters(model: nnx.Module) -> None:
    """Non-zero A and B on every adapter (B starts at zero in training), deterministic."""
    rng = np.random.default_rng(0)
    for _, target in lora_targets(model):
        a, b = target.lora_a, target.lora_b
        assert a is not None and b is not None
        a[...] = jnp.asarray(0.3 * rng.standard_normal(a[...].shape), a[...].dtype)
        b[...] = jnp.asarray(0.05 * rng.standard_normal(b[...].shape), b[...].dtype)


def jax_logits(model: nnx.Module, inputs: ParityInputs) -> np.ndarray:
    """Our forward (jitted) on a single-device copy of `model` (a checkpoint's is sharded over 8 CPU devices)."""
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
    b = inputs.batch

    @nnx.jit
    def forward(model, vision, ids, positions, mask, gather):
        hidden, _ = model(ids, positions, mask, model.encode_vision(vision), gather)
        return model.logits(hidden)

    vision = {k: jnp.asarray(v) for k, v in b.vision.items()}
    arrays = [jnp.asarray(x) for x in (b.input_ids, b.positions, b.attention_mask, b.vision_gather)]
    return np.asarray(forward(model, vision, *arrays))


def hf_logits(model, inputs: ParityInputs) -> np.ndarray:
    """transformers' (or a PEFT-wrapped transformers model's) logits on the same inputs."""
    import torch

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    explicit = {} if inputs.position_ids is None else {"position_ids": t(inputs.position_ids.astype(np.int64))}
    with torch.no_grad():
        out = model(
            input_ids=t(inputs.batch.input_ids.astype(np.int64)),
            attention_mask=t(inputs.batch.attention_mask.astype(np.int64)),
            **explicit,
            **{k: t(v) for k, v in inputs.hf_inputs.items()},
        )
    return out.logits.float().numpy()
