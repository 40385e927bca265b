"""The jitted train steps: GRPO (policy log-probs, clipped loss, KL to a frozen reference) and SFT (cross-entropy on
answer tokens), sharing one forward that encodes each prompt's images once and broadcasts them to its G rows.

State is split with nnx into trainable variables (what the optimizer sees: all params, all but `visual`, or only
LoRA adapters) and frozen ones; the step is a pure function of (state, batch) with the state donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vlmr1_jax.models.layers import LoRADropoutKey, LoRAParam
from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL
from vlmr1_jax.models.qwen2_5_vl.text import KVCache
from vlmr1_jax.rl.grpo import make_loss, token_logprobs
from vlmr1_jax.rl.lora import set_lora_dropout_keys

TRAINABLE_FILTERS: dict[str, Any] = {
    "full": nnx.Param,
    "freeze_vision": nnx.All(nnx.Param, nnx.Not(nnx.PathContains("visual"))),
    "lora": LoRAParam,
}


def trainable_filter(mode: str) -> Any:
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
    """AdamW with global-norm clipping and linear decay (VLM-R1 / HF Trainer defaults), with accumulation."""
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    elif cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.learning_rate)
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r}; choose linear or constant")
    schedule = optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps), main],
                                    [cfg.warmup_steps]) if cfg.warmup_steps else main
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                     optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx, schedule


def init_train_state(model: Qwen25VL, mode: str, optimizer: optax.GradientTransformation, with_reference: bool,
                     frozen_dtype: jnp.dtype | None = None) -> tuple[nnx.GraphDef, TrainState]:
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


def completion_logprobs(model: Qwen25VL, prompts: dict[str, jax.Array], tokens: jax.Array, mask: jax.Array,
                        num_samples: int) -> jax.Array:
    """log p(token) for each completion token [B, T]; B = P * num_samples rows of P prompts.

    Shared prefix: each prompt (and its images) runs through the model once, its KV cache is fanned out to its
    G rows, and only the completions run per row. Causal attention makes this equal to the full
    prompt + completion forward, at (P*L + B*T) instead of B*(L + T) tokens; gradients flow through the cache.
    """
    prompt_len = prompts["input_ids"].shape[1]
    steps = tokens.shape[1]
    features = model.encode_vision(prompts["pixel_values"], prompts["hw_positions"], prompts["frame_ids"],
                                   prompts["frame_index"])
    cache = KVCache.empty(model.cfg.text, prompts["input_ids"].shape[0], prompt_len + steps, model.text.dtype)
    hidden, cache = model(prompts["input_ids"], prompts["positions"], prompts["attention_mask"], features,  # type: ignore[assignment]
                          prompts["vision_gather"], cache)
    first = jnp.repeat(model.logits(hidden[:, -1]), num_samples, axis=0)  # predicts completion token 0
    positions = jnp.repeat(prompts["next_position"], num_samples)[:, None] + jnp.arange(steps)[None]
    hidden, _ = model(tokens, jnp.broadcast_to(positions[None], (3, *positions.shape)), mask.astype(jnp.int32),
                      cache=cache.repeat(num_samples))
    rest = chunked_logprobs(model, hidden[:, :-1], tokens[:, 1:])
    return jnp.concatenate([token_logprobs(first, tokens[:, 0])[:, None], rest], axis=1)


def chunked_logprobs(model: Qwen25VL, hidden: jax.Array, targets: jax.Array) -> jax.Array:
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


def _merge(graphdef: nnx.GraphDef, trainable: nnx.State, frozen: nnx.State) -> Qwen25VL:
    return nnx.merge(graphdef, trainable, frozen)


def _train_model(graphdef: nnx.GraphDef, state: TrainState, trainable: nnx.State, seed: int) -> Qwen25VL:
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


def _apply_gradients(state: TrainState, loss: jax.Array, grads: nnx.State, optimizer: optax.GradientTransformation,
                     schedule: optax.Schedule, grad_accum: int) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update, skipped (parameters and optimizer state left as they were) when the loss, the gradient
    or the update is not finite; `nonfinite` = 1 in the metrics then. The step counter advances either way."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    trainable = keep(optax.apply_updates(state.trainable, updates), state.trainable)
    metrics = {"grad_norm": grad_norm, "learning_rate": schedule(state.step // grad_accum),
               "nonfinite": (~finite).astype(jnp.float32)}
    return dataclasses.replace(state, step=state.step + 1, trainable=trainable,
                               opt_state=keep(opt_state, state.opt_state)), metrics


def make_grpo_step(graphdef: nnx.GraphDef, grpo_cfg, optimizer: optax.GradientTransformation,
                   schedule: optax.Schedule, grad_accum: int = 1, seed: int = 0) -> Callable:
    """Jitted, donated `(state, batch) -> (state, metrics)`.

    batch: `prompts` (PromptBatch arrays for P prompts), `tokens`/`mask` [B, T], `advantages` [B], and
    `ref_logprobs` / `old_logprobs` [B, T] (None when beta == 0 / num_iterations == 1).
    """
    algorithm = grpo_cfg.algorithm()
    loss_fn = make_loss(algorithm.objective, algorithm.aggregation)
    num_samples = grpo_cfg.num_generations

    def step(state: TrainState, batch: dict[str, Any]):
        def objective(trainable):
            model = _train_model(graphdef, state, trainable, seed)
            logp = completion_logprobs(model, batch["prompts"], batch["tokens"], batch["mask"], num_samples)
            return loss_fn(logp, batch.get("old_logprobs"), batch.get("ref_logprobs"), batch["advantages"],
                           batch["mask"], epsilon=grpo_cfg.epsilon, epsilon_high=grpo_cfg.epsilon_high,
                           beta=grpo_cfg.beta, max_completion_length=batch["tokens"].shape[1])

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.trainable)
        state, extra = _apply_gradients(state, loss, grads, optimizer, schedule, grad_accum)
        return state, {"loss": loss, **metrics, **extra}

    return jax.jit(step, donate_argnums=0)


def make_sft_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                  grad_accum: int = 1, seed: int = 0) -> Callable:
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


def current_model(graphdef: nnx.GraphDef, state: TrainState) -> Qwen25VL:
    return _merge(graphdef, state.trainable, state.frozen)
