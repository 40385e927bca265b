"""What the LoRA export tests compare: random non-zero adapters, our jitted logits, and transformers' logits on the
same parity inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ports.parity import ParityInputs, positions_for, vision_layout
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
    cfg = model.cfg
    positions, _ = positions_for(cfg, inputs)
    plan, gather = vision_layout(
        cfg, inputs.input_ids, inputs.image_pixels, inputs.image_grids, len(inputs.image_grids)
    )

    @nnx.jit
    def forward(model, vision, ids, positions, mask, gather):
        hidden, _ = model(ids, positions, mask, model.encode_vision(vision), gather)
        return model.logits(hidden)

    vision = {k: jnp.asarray(v) for k, v in plan.device_inputs().items()}
    arrays = [jnp.asarray(x) for x in (inputs.input_ids, positions, inputs.attention_mask, gather)]
    return np.asarray(forward(model, vision, *arrays))


def hf_logits(model, inputs: ParityInputs, cfg) -> np.ndarray:
    """transformers' (or a PEFT-wrapped transformers model's) logits on the same inputs and positions."""
    import torch

    positions, _ = positions_for(cfg, inputs)
    t = torch.from_numpy
    with torch.no_grad():
        out = model(
            input_ids=t(inputs.input_ids),
            attention_mask=t(inputs.attention_mask),
            position_ids=t(positions),
            pixel_values=t(inputs.image_pixels),
            image_grid_thw=torch.tensor(inputs.image_grids),
        )
    return out.logits.float().numpy()
