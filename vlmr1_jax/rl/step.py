"""The jitted train steps: GRPO (policy log-probs, clipped loss, KL to a frozen reference) and SFT (cross-entropy on
answer tokens), sharing one forward that prefills each prompt and encodes its images once, then runs its G
completions on the fanned-out cache (`rl/prefix.py`).

Each step is a pure function of (`TrainState`, batch) with the state donated (`rl/state.py` builds the state).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vlmr1_jax.models.family import VisionLanguageModel
from vlmr1_jax.models.layers import LoRADropoutKey
from vlmr1_jax.rl.grpo import check_algorithm, make_loss, token_logprobs
from vlmr1_jax.rl.lora import set_lora_dropout_keys
from vlmr1_jax.rl.prefix import prefill_fan_out
from vlmr1_jax.rl.rollout import TrainExample
from vlmr1_jax.rl.state import TrainState


def completion_logprobs(
    model: VisionLanguageModel, prompts: dict[str, jax.Array], tokens: jax.Array, mask: jax.Array, num_samples: int
) -> jax.Array:
    """log p(token) for each completion token [B, T]; B = P * num_samples rows of P prompts.

    Shared prefix: each prompt (and its images) runs through the model once, its KV cache is fanned out to its
    G rows, and only the completions run per row. Causal attention makes this equal to the full
    prompt + completion forward, at (P*L + B*T) instead of B*(L + T) tokens; gradients flow through the cache.
    """
    steps = tokens.shape[1]
    first, cache, next_position = prefill_fan_out(model, prompts, num_samples, steps)  # first predicts token 0
    positions = next_position[:, None] + jnp.arange(steps)[None]
    hidden, _ = model(
        tokens, jnp.broadcast_to(positions[None], (3, *positions.shape)), mask.astype(jnp.int32), cache=cache
    )
    rest = chunked_logprobs(model, hidden[:, :-1], tokens[:, 1:])
    return jnp.concatenate([token_logprobs(first, tokens[:, 0])[:, None], rest], axis=1)


def chunked_logprobs(model: VisionLanguageModel, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) [B, T] from final hidden states [B, T, D], `model.text.logits_chunk` positions at a time with
    rematerialisation, so the [B, T, vocab] float32 logits (the largest training temporary at long completions
    and a 152k vocabulary) never exist at once, forward or backward."""
    rows, length, width = hidden.shape
    chunk = model.text.logits_chunk
    if length <= chunk:
        return token_logprobs(model.logits(hidden), targets)
    count = -(-length // chunk)
    pad = count * chunk - length
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(rows, count, chunk, width).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(rows, count, chunk).swapaxes(0, 1)
    graphdef, text_state = nnx.split(model.text)

    @jax.checkpoint
    def one(text_state, h, y, index):
        text = nnx.merge(graphdef, text_state)
        head = text.lm_head
        if head is not None and head.lora_dropout_key is not None:  # fresh adapter-dropout masks per chunk
            head.lora_dropout_key = LoRADropoutKey(jax.random.fold_in(head.lora_dropout_key[...], index))
        return token_logprobs(text.logits(h), y)

    _, out = jax.lax.scan(lambda _, xs: (None, one(text_state, *xs)), None, (hidden, targets, jnp.arange(count)))
    return out.swapaxes(0, 1).reshape(rows, count * chunk)[:, :length]


def _merge(graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State) -> VisionLanguageModel:
    return nnx.merge(graphdef, trainable, frozen)


def _train_model(graphdef: nnx.GraphDef, state: TrainState, trainable: nnx.State, seed: int) -> VisionLanguageModel:
    """The model a train step differentiates: LoRA dropout on, its masks a function of (seed, state.step)."""
    model = _merge(graphdef, trainable, state.frozen)
    set_lora_dropout_keys(model, jax.random.fold_in(jax.random.key(seed), state.step))
    return model


def make_logprob_fn(graphdef: nnx.GraphDef, num_samples: int) -> Callable:
    """Jitted `(trainable, frozen, prompts, tokens, mask) -> logp` for reference / old log-probs at rollout time."""

    @jax.jit
    def run(trainable, frozen, prompts, tokens, mask):
        return completion_logprobs(_merge(graphdef, trainable, frozen), prompts, tokens, mask, num_samples)

    return run


def _apply_gradients(
    state: TrainState,
    loss: jax.Array,
    grads: nnx.State,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update, skipped (parameters and optimizer state left as they were) when the loss, the gradient
    or the update is not finite; `nonfinite` = 1 in the metrics then. The step counter advances either way."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    trainable = keep(optax.apply_updates(state.trainable, updates), state.trainable)
    metrics = {
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step // grad_accum),
        "nonfinite": (~finite).astype(jnp.float32),
    }
    return dataclasses.replace(
        state, step=state.step + 1, trainable=trainable, opt_state=keep(opt_state, state.opt_state)
    ), metrics


def make_grpo_step(
    graphdef: nnx.GraphDef,
    grpo_cfg,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int = 1,
    seed: int = 0,
) -> Callable:
    """Jitted, donated `(state, batch) -> (state, metrics)`.

    batch: a `TrainExample`; its `ref_logprobs` / `old_logprobs` are None when beta == 0 / num_iterations == 1
    (a separate compiled program per combination, since None is part of the pytree structure).
    """
    algorithm = check_algorithm(grpo_cfg)
    loss_fn = make_loss(algorithm.objective, algorithm.aggregation)
    num_samples = grpo_cfg.num_generations

    def step(state: TrainState, batch: TrainExample):
        def objective(trainable):
            model = _train_model(graphdef, state, trainable, seed)
            logp = completion_logprobs(model, batch.prompts, batch.tokens, batch.mask, num_samples)
            return loss_fn(
                logp,
                batch.old_logprobs,
                batch.ref_logprobs,
                jnp.asarray(batch.advantages),
                batch.mask,
                epsilon=grpo_cfg.epsilon,
                epsilon_high=grpo_cfg.epsilon_high,
                beta=grpo_cfg.beta,
                max_completion_length=batch.tokens.shape[1],
            )

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
        state, extra = _apply_gradients(state, loss, grads, optimizer, schedule, grad_accum)
        return state, {"loss": loss, **metrics, **extra}

    return jax.jit(step, donate_argnums=0)


def make_sft_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int = 1,
    seed: int = 0,
) -> Callable:
    """Jitted `(state, batch) -> (state, metrics)`: mean cross-entropy over answer tokens (`tokens`, `mask`)."""

    def step(state: TrainState, batch: dict[str, Any]):
        def objective(trainable):
            model = _train_model(graphdef, state, trainable, seed)
            logp = completion_logprobs(model, batch["prompts"], batch["tokens"], batch["mask"], 1)
            mask = batch["mask"].astype(jnp.float32)
            return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)

        loss, grads = jax.value_and_grad(objective)(state.trainable)
        state, extra = _apply_gradients(state, loss, grads, optimizer, schedule, grad_accum)
        return state, {"loss": loss, **extra}

    return jax.jit(step, donate_argnums=0)
