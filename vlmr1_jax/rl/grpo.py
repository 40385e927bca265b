"""GRPO-family math as pure JAX functions: group advantages, completion masks, token log-probs, and the loss.

A GRPO variant is three independent choices, each a registry of functions: the advantage estimator (rewards of a
group -> advantages), the token objective (log-probs and advantages -> per-token loss) and the aggregation (per-token
loss -> one scalar); `config.LOSS_PRESETS` names the usual combinations (docs/grpo.md). Any part may also be a
user function given as 'package.module:function'. Everything is safe under `jax.jit`; options (epsilon, beta, ...)
are static Python values. Semantics follow VLM-R1's `VLMGRPOTrainer` (docs/facts.md: Loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar, cast

import jax
import jax.numpy as jnp

from vlmr1_jax.config import Algorithm, GRPOConfig
from vlmr1_jax.user_code import import_function

Array = jax.Array
Metrics = dict[str, Array]
F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Functions of one kind by name; `get` also accepts a user function as 'package.module:function'."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator adding `fn` under `name` (a second function with the same name is an error)."""

        def add(fn: F) -> F:
            if name in self._fns and self._fns[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered (to {self._fns[name].__qualname__})")
            self._fns[name] = fn
            return fn

        return add

    def names(self) -> list[str]:
        return sorted(self._fns)

    def get(self, name: str) -> F:
        """The function registered as `name`, or imported from 'package.module:function'."""
        if ":" in name:
            return cast(F, import_function(name, self.kind))
        if name not in self._fns:
            raise ValueError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}, "
                f"or a user function as 'package.module:function'"
            )
        return self._fns[name]


# ---------------------------------------------------------------- advantage estimators


class AdvantageFn(Protocol):
    """float32 rewards [N, G] (N groups of G samples of one prompt) -> advantages [N, G]."""

    def __call__(self, rewards: Array) -> Array: ...


ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")


def _centred(grouped: Array) -> Array:
    """`r - mean_g(r)`, centred on each group's first reward before averaging, so an all-equal group gives exactly 0."""
    shifted = grouped - grouped[:, :1]
    return shifted - shifted.mean(axis=1, keepdims=True)


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(rewards: Array) -> Array:
    """VLM-R1 / GRPO: `(r - mean_g) / (std_g + 1e-4)` with the unbiased (N-1) std, as torch.std."""
    return _centred(rewards) / (jnp.std(rewards - rewards[:, :1], axis=1, ddof=1, keepdims=True) + 1e-4)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(rewards: Array) -> Array:
    """Dr.GRPO: `r - mean_g`, no std scaling (a group's reward spread is not divided away)."""
    return _centred(rewards)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(rewards: Array) -> Array:
    """RLOO: `r_i - mean_{j != i} r_j` (leave-one-out baseline), which is `G / (G - 1) * (r_i - mean_g)`."""
    size = rewards.shape[1]
    return _centred(rewards) * (size / (size - 1))


def group_advantages(rewards: Array, group_size: int, estimator: str = "grpo") -> tuple[Array, Array]:
    """Advantages for groups of `group_size` consecutive rows by `estimator` (a registered name or a user path),
    and each group's unbiased reward std (for `reward_std`). Returns `(advantages [B], group_std [B // group_size])`,
    both float32."""
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [B], got shape {rewards.shape}")
    if group_size < 2:
        raise ValueError(f"group_advantages: group_size must be >= 2 (unbiased std), got {group_size}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"group_advantages: batch {rewards.shape[0]} is not a multiple of group_size {group_size}")
    grouped = rewards.reshape(-1, group_size)
    advantages = jnp.asarray(ADVANTAGE_ESTIMATORS.get(estimator)(grouped), jnp.float32)
    if advantages.shape != grouped.shape:
        raise ValueError(
            f"advantage estimator {estimator!r} returned shape {advantages.shape} for rewards "
            f"{grouped.shape}; it must keep the [groups, group_size] shape"
        )
    return advantages.reshape(-1), jnp.std(grouped - grouped[:, :1], axis=1, ddof=1)


# ---------------------------------------------------------------- completion masks and token log-probs


def completion_mask(completion_ids: Array, eos_ids: int | Sequence[int]) -> Array:
    """int32 [B, T] mask: 1 up to and including the first token in `eos_ids`, 0 after; all ones without an EOS."""
    completion_ids = jnp.asarray(completion_ids)
    eos = jnp.asarray(eos_ids, dtype=completion_ids.dtype).reshape(-1)
    if completion_ids.ndim != 2:
        raise ValueError(f"completion_mask: completion_ids must be [B, T], got shape {completion_ids.shape}")
    if eos.size == 0:
        raise ValueError("completion_mask: eos_ids is empty")
    is_eos = jnp.isin(completion_ids, eos).astype(jnp.int32)
    eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
    return (eos_before == 0).astype(jnp.int32)


def token_logprobs(logits: Array, targets: Array) -> Array:
    """float32 log p(target) per position: `logits[..., target] - logsumexp(logits)`, with no [.., V] one-hot.

    Unlike VLM-R1 (bf16 log_softmax) this upcasts to float32, so ratios near 1 are not lost to rounding.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"token_logprobs: logits {logits.shape} and targets {targets.shape} disagree")
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


# ---------------------------------------------------------------- token objectives


class ObjectiveFn(Protocol):
    """`(logp, old_logp, advantages, mask, *, epsilon, epsilon_high) -> (per-token loss [B, T], metrics)`.

    logp/old_logp: [B, T] float32 (old_logp is never None here); advantages [B]; mask [B, T] float 0/1. Metrics are
    scalars averaged over valid tokens (may be empty). Masked positions may hold anything: aggregation drops them.
    """

    def __call__(
        self, logp: Array, old_logp: Array, advantages: Array, mask: Array, *, epsilon: float, epsilon_high: float
    ) -> tuple[Array, Metrics]: ...


OBJECTIVES: Registry[ObjectiveFn] = Registry("objective")


def _seq_mean(x: Array, mask: Array) -> Array:
    """Masked mean over tokens per sequence, [B, T] -> [B]; a fully masked row gives 0, not NaN."""
    return jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def _clipped_surrogate(
    log_ratio: Array, advantages: Array, mask: Array, epsilon: float, epsilon_high: float
) -> tuple[Array, Metrics]:
    """`-min(ratio*A, clip(ratio, 1-eps, 1+eps_high)*A)` per token and its metrics, for any ratio [B, T].

    `clip_ratio` is VLM-R1's count of tokens with `ratio*A < clipped*A` (ratio out of range on the side where the min
    keeps the unclipped term); `clip_active_ratio` counts the tokens whose gradient the clip removes.
    """
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    adv = advantages[:, None]
    objective, clipped_objective = ratio * adv, clipped * adv
    n_tokens = jnp.maximum(jnp.sum(mask), 1.0)
    metrics = {
        "clip_ratio": jnp.sum((objective < clipped_objective) * mask) / n_tokens,
        "clip_active_ratio": jnp.sum((clipped_objective < objective) * mask) / n_tokens,
        "ratio_mean": jnp.sum(ratio * mask) / n_tokens,
    }
    return -jnp.minimum(objective, clipped_objective), metrics


@OBJECTIVES.register("ppo_clip")
def ppo_clip(
    logp: Array, old_logp: Array, advantages: Array, mask: Array, *, epsilon: float, epsilon_high: float
) -> tuple[Array, Metrics]:
    """GRPO / PPO: per-token ratio `exp(logp - old_logp)`, clipped to [1 - epsilon, 1 + epsilon_high]."""
    return _clipped_surrogate(logp - old_logp, advantages, mask, epsilon, epsilon_high)


@OBJECTIVES.register("gspo")
def gspo(
    logp: Array, old_logp: Array, advantages: Array, mask: Array, *, epsilon: float, epsilon_high: float
) -> tuple[Array, Metrics]:
    """GSPO (the sequence objective, not GSPO-token): one ratio per sequence, `s_i = exp(masked mean_t(logp - old))`,
    clipped as in `ppo_clip`, on every token of the sequence. The paper uses a far smaller epsilon (3e-4 / 4e-4)
    than token-level GRPO; metrics are token-weighted."""
    log_ratio = jnp.broadcast_to(_seq_mean(logp - old_logp, mask)[:, None], logp.shape)
    return _clipped_surrogate(log_ratio, advantages, mask, epsilon, epsilon_high)


# ---------------------------------------------------------------- aggregations


class AggregationFn(Protocol):
    """`(per_token [B, T], mask [B, T] float 0/1, max_completion_length) -> scalar loss`."""

    def __call__(self, per_token: Array, mask: Array, max_completion_length: int) -> Array: ...


AGGREGATIONS: Registry[AggregationFn] = Registry("aggregation")


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(per_token: Array, mask: Array, max_completion_length: int) -> Array:
    """VLM-R1 / GRPO: masked mean over each sequence's tokens, then the mean over sequences."""
    return jnp.mean(_seq_mean(per_token, mask))


@AGGREGATIONS.register("token_mean")
def token_mean(per_token: Array, mask: Array, max_completion_length: int) -> Array:
    """DAPO: mean over all valid tokens of the batch (long completions weigh more than under seq_mean_token_mean)."""
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@AGGREGATIONS.register("token_sum_norm")
def token_sum_norm(per_token: Array, mask: Array, max_completion_length: int) -> Array:
    """Dr.GRPO: sum over valid tokens / (B * max_completion_length), a constant that does not depend on lengths."""
    return jnp.sum(per_token * mask) / (per_token.shape[0] * max_completion_length)


# ---------------------------------------------------------------- presets and the loss


def check_algorithm(g: GRPOConfig) -> Algorithm:
    """`g`'s algorithm, each part resolved in its registry now (user paths imported), so a typo fails before any
    compile with an error naming the field."""
    algorithm = g.algorithm()
    for field, registry in (
        ("advantage_estimator", ADVANTAGE_ESTIMATORS),
        ("objective", OBJECTIVES),
        ("aggregation", AGGREGATIONS),
    ):
        try:
            registry.get(getattr(algorithm, field))
        except ValueError as err:
            raise ValueError(
                f"grpo.{field}={getattr(algorithm, field)!r}: expected one of {registry.names()} or a user function "
                f"'package.module:function' ({err})"
            ) from None
    return algorithm


# The loss `make_loss` builds: (logp, old_logp, ref_logp, advantages, mask, *, epsilon, epsilon_high, beta,
# max_completion_length) -> (loss, metrics); see there for the arguments.
LossFn = Callable[..., tuple[Array, Metrics]]


def make_loss(objective: str = "ppo_clip", aggregation: str = "seq_mean_token_mean") -> LossFn:
    """The loss `aggregation(objective per token + beta * k3 KL to the reference)`; parts by name or user path.

    The loss takes logp/old_logp/ref_logp: [B, T] float32 token log-probs of the policy, the rollout policy and the
    reference; `old_logp=None` when num_iterations == 1 means `stop_gradient(logp)` (ratio 1, gradient -A).
    `ref_logp` may be None when `beta == 0` (no KL term, no `kl` metric). advantages: [B]; mask: [B, T] (0/1).
    `epsilon_high=None` is a symmetric clip; `max_completion_length` (default T) is the aggregation's constant.
    Returns `(loss, metrics)`; dividing by gradient-accumulation steps is the caller's job.
    """
    objective_fn, aggregate = OBJECTIVES.get(objective), AGGREGATIONS.get(aggregation)

    def loss(
        logp: Array,
        old_logp: Array | None,
        ref_logp: Array | None,
        advantages: Array,
        mask: Array,
        *,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        beta: float = 0.04,
        max_completion_length: int | None = None,
    ) -> tuple[Array, Metrics]:
        if logp.ndim != 2 or mask.shape != logp.shape or advantages.shape != logp.shape[:1]:
            raise ValueError(
                f"loss: need logp [B, T], mask [B, T], advantages [B]; got {logp.shape}, {mask.shape}, "
                f"{advantages.shape}"
            )
        if beta != 0.0 and ref_logp is None:
            raise ValueError(f"loss: beta={beta} needs ref_logp (pass beta=0 to train without a reference model)")
        mask = mask.astype(logp.dtype)
        old = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
        per_token, metrics = objective_fn(
            logp, old, advantages, mask, epsilon=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high
        )
        if per_token.shape != logp.shape:
            raise ValueError(
                f"objective {objective!r} returned a per-token loss of shape {per_token.shape}, expected {logp.shape}"
            )
        metrics = dict(metrics)
        if beta != 0.0:
            assert ref_logp is not None  # checked above
            delta = ref_logp - logp
            kl = jnp.exp(delta) - delta - 1.0  # k3 estimator of KL(policy || reference)
            per_token = per_token + beta * kl
            metrics["kl"] = jnp.mean(_seq_mean(kl, mask))
        total = aggregate(per_token, mask, logp.shape[1] if max_completion_length is None else max_completion_length)
        if jnp.shape(total) != ():
            raise ValueError(f"aggregation {aggregation!r} returned shape {jnp.shape(total)}, expected a scalar")
        return total, jax.tree.map(jax.lax.stop_gradient, metrics)

    return loss
