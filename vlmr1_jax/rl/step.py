"""The jitted train steps: GRPO (policy log-probs, clipped loss, KL to a frozen reference) and SFT (cross-entropy on
answer tokens), sharing one forward that prefills each prompt and encodes its images once, then runs its G
completions on the fanned-out cache (`rl/prefix.py`).

Each step is one optimizer update, a pure function of (`TrainState`, micro-batches) with the state donated
(`rl/state.py` builds the state); with gradient accumulation it averages the gradients of `optim.grad_accum`
micro-batches (`TrainStep`).
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


def _train_model(
    graphdef: nnx.GraphDef, state: TrainState, trainable: nnx.State, seed: int, micro_step: jax.Array
) -> VisionLanguageModel:
    """The model a train step differentiates: LoRA dropout on, its masks a function of (seed, micro-step)."""
    model = _merge(graphdef, trainable, state.frozen)
    set_lora_dropout_keys(model, jax.random.fold_in(jax.random.key(seed), micro_step))
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
        "learning_rate": schedule(state.step),
        "nonfinite": (~finite).astype(jnp.float32),
    }
    return dataclasses.replace(
        state, step=state.step + 1, trainable=trainable, opt_state=keep(opt_state, state.opt_state)
    ), metrics


# `(trainable, state, batch, micro_step) -> (loss, metrics)`: what a train step differentiates.
Objective = Callable[[nnx.State, TrainState, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Accumulated:
    """Sums over the micro-batches of one update so far: gradient, loss, loss metrics, and how many."""

    grads: nnx.State
    loss: jax.Array
    metrics: dict[str, jax.Array]
    count: jax.Array  # int32


class TrainStep:
    """One optimizer update per call: `step(state, batch)`, or with gradient accumulation
    `step(state, *micro_batches)` (`grad_accum` of them), the update on their mean gradient.

    VLM-R1 (HF Trainer) divides each micro-batch's loss by GA and sums the gradients; the mean is the same update.
    Each micro-batch but the last runs as its own program that adds its gradient to `Accumulated`, so one
    micro-batch's activations are live at a time and one compiled program serves every accumulation slot; the last
    one's program adds its gradient and applies the update. Without accumulation that is the plain fused step.
    `TrainState.step` counts optimizer updates; micro-batch k of update s is micro-step `s * grad_accum + k`,
    which seeds its LoRA dropout masks.
    """

    def __init__(
        self,
        objective: Objective,
        optimizer: optax.GradientTransformation,
        schedule: optax.Schedule,
        grad_accum: int = 1,
    ):
        self.grad_accum = grad_accum

        def add(state: TrainState, batch: Any, partial: Accumulated | None) -> Accumulated:
            count = jnp.zeros((), jnp.int32) if partial is None else partial.count
            micro_step = state.step * grad_accum + count
            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
                state.trainable, state, batch, micro_step
            )
            if partial is None:
                return Accumulated(grads, loss, metrics, count + 1)
            return Accumulated(
                jax.tree.map(jnp.add, partial.grads, grads),
                partial.loss + loss,
                {k: partial.metrics[k] + v for k, v in metrics.items()},
                count + 1,
            )

        def update(
            state: TrainState, batch: Any, partial: Accumulated | None
        ) -> tuple[TrainState, dict[str, jax.Array]]:
            total = add(state, batch, partial)
            loss, metrics, grads = total.loss, total.metrics, total.grads
            if partial is not None:  # the mean over the micro-batches
                n = total.count.astype(jnp.float32)
                loss, metrics, grads = jax.tree.map(lambda x: x / n, (loss, metrics, grads))
            state, extra = _apply_gradients(state, loss, grads, optimizer, schedule)
            return state, {"loss": loss, **metrics, **extra}

        self._add = jax.jit(add, donate_argnums=2)
        self.update = jax.jit(update, donate_argnums=0)  # the partial sum cannot alias an output

    def __call__(self, state: TrainState, *batches: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        """The state after one update on `batches` (dispatched asynchronously), and its device metrics."""
        if len(batches) != self.grad_accum:
            raise ValueError(
                f"a train step takes optim.grad_accum={self.grad_accum} micro-batches per update, got {len(batches)}"
            )
        partial = None
        for batch in batches[:-1]:
            partial = self._add(state, batch, partial)
        return self.update(state, batches[-1], partial)

    def lower(self, state: TrainState, batch: Any) -> jax.stages.Lowered:
        """The update program as a run executes it (with a partial sum when accumulating), for `vlmr1 plan`."""
        partial = None if self.grad_accum == 1 else jax.eval_shape(self._add, state, batch, None)
        return self.update.lower(state, batch, partial)


def make_grpo_step(
    graphdef: nnx.GraphDef,
    grpo_cfg,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int = 1,
    seed: int = 0,
) -> TrainStep:
    """The GRPO update, `(state, *micro_batches) -> (state, metrics)` with the state donated.

    A micro-batch is a `TrainExample`; its `ref_logprobs` / `old_logprobs` are None when beta == 0 /
    num_iterations == 1 (a separate compiled program per combination, since None is part of the pytree structure).
    """
    algorithm = check_algorithm(grpo_cfg)
    loss_fn = make_loss(algorithm.objective, algorithm.aggregation)
    num_samples = grpo_cfg.num_generations

    def objective(trainable: nnx.State, state: TrainState, batch: TrainExample, micro_step: jax.Array):
        model = _train_model(graphdef, state, trainable, seed, micro_step)
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

    return TrainStep(objective, optimizer, schedule, grad_accum)


def make_sft_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int = 1,
    seed: int = 0,
) -> TrainStep:
    """The SFT update, `(state, *micro_batches) -> (state, metrics)`: mean cross-entropy over answer tokens
    (`tokens`, `mask`) of each micro-batch."""

    def objective(trainable: nnx.State, state: TrainState, batch: dict[str, Any], micro_step: jax.Array):
        model = _train_model(graphdef, state, trainable, seed, micro_step)
        logp = completion_logprobs(model, batch["prompts"], batch["tokens"], batch["mask"], 1)
        mask = batch["mask"].astype(jnp.float32)
        return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0), {}

    return TrainStep(objective, optimizer, schedule, grad_accum)
