"""What a training run carries from step to step: the `TrainState` pytree (trainable / frozen split of the model,
optimizer state, frozen reference policy), the optimizer that updates it, and how it is built from a model.

State is split with nnx into trainable variables (what the optimizer sees: all params, all but `visual`, or only
LoRA adapters) and frozen ones; the jitted steps (`rl/step.py`) are pure functions of this state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vlmr1_jax.models.family import VisionLanguageModel
from vlmr1_jax.models.layers import LoRAParam

TRAINABLE_FILTERS: dict[str, Any] = {
    "full": nnx.Param,
    "freeze_vision": nnx.All(nnx.Param, nnx.Not(nnx.PathContains("visual"))),
    "lora": LoRAParam,
}


def trainable_filter(mode: str) -> Any:
    """The nnx filter selecting the variables `train.trainable=mode` trains."""
    try:
        return TRAINABLE_FILTERS[mode]
    except KeyError:
        raise ValueError(f"train.trainable={mode!r}; choose one of {sorted(TRAINABLE_FILTERS)}") from None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    trainable: nnx.State
    frozen: nnx.State
    opt_state: optax.OptState
    reference: nnx.State | None  # trainable variables of the frozen reference policy (None when beta == 0)


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping and linear decay (VLM-R1 / HF Trainer defaults).

    `total_steps` and `cfg.warmup_steps` count optimizer updates (the schedule is evaluated at Adam's update count),
    so the linear decay reaches 0 after the last update whatever `cfg.grad_accum` is: the train step
    (`rl/step.py`) averages the accumulated micro-batches into one update.
    """
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    elif cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.learning_rate)
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r}; choose linear or constant")
    schedule = (
        optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps), main], [cfg.warmup_steps]
        )
        if cfg.warmup_steps
        else main
    )
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )
    return tx, schedule


def init_train_state(
    model: VisionLanguageModel,
    mode: str,
    optimizer: optax.GradientTransformation,
    with_reference: bool,
    frozen_dtype: jnp.dtype | None = None,
) -> tuple[nnx.GraphDef, TrainState]:
    """Split `model` into trainable / frozen state; the reference copies the initial trainable variables
    (for LoRA it is the base model: the same state with the adapters zeroed).

    The trainable variables keep the model's parameter dtype (AdamW's master weights; its moments follow them).
    `frozen_dtype` (None: unchanged) stores the frozen variables and the reference in that dtype, e.g. bf16 to
    halve their memory; compute is unaffected, since every layer casts its parameters to `model.dtype` at use.
    """
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(mode), ...)  # type: ignore[misc]

    def store(x: jax.Array) -> jax.Array:
        floating = frozen_dtype is not None and jnp.issubdtype(x.dtype, jnp.floating)
        return x.astype(frozen_dtype) if floating else x

    frozen = jax.tree.map(store, frozen)
    reference = None
    if with_reference:
        copy = jnp.zeros_like if mode == "lora" else jnp.copy
        reference = jax.tree.map(lambda x: store(copy(x)), trainable)
    opt_state = optimizer.init(trainable)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), trainable, frozen, opt_state, reference)


def current_model(graphdef: nnx.GraphDef, state: TrainState) -> VisionLanguageModel:
    """The policy as a module (trainable and frozen variables merged back)."""
    return nnx.merge(graphdef, state.trainable, state.frozen)
