"""GRPO-family math as pure JAX functions: group advantages, completion masks, token log-probs, registered losses.

Everything is a pure function of arrays and safe under `jax.jit`; loss options (epsilon, beta, ...) are static Python
values. Semantics follow VLM-R1's `VLMGRPOTrainer` (docs/facts.md: Loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp

Array = jax.Array
Metrics = dict[str, Array]


def group_advantages(
    rewards: Array, group_size: int, scale_rewards: bool = True, eps: float = 1e-4
) -> tuple[Array, Array]:
    """Advantages for groups of `group_size` consecutive rows, and each group's unbiased std (for `reward_std`).

    VLM-R1: `(r - mean_g) / (std_g + eps)` with torch.std's N-1 std; `scale_rewards=False` gives Dr.GRPO's
    `r - mean_g`. Returns `(advantages [B], group_std [B // group_size])`, both float32.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [B], got shape {rewards.shape}")
    if group_size < 2:
        raise ValueError(f"group_advantages: group_size must be >= 2 (unbiased std), got {group_size}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"group_advantages: batch {rewards.shape[0]} is not a multiple of group_size {group_size}")
    grouped = rewards.reshape(-1, group_size)
    # Centre on each group's first reward before averaging, so an all-equal group gives exactly 0 (no rounding).
    shifted = grouped - grouped[:, :1]
    centred = shifted - shifted.mean(axis=1, keepdims=True)
    std = jnp.std(shifted, axis=1, ddof=1)
    advantages = centred / (std[:, None] + eps) if scale_rewards else centred
    return advantages.reshape(-1), std


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


class LossFn(Protocol):
    """The one signature every registered loss has; see `grpo_loss` for the meaning of each argument."""

    def __call__(
        self,
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
    ) -> tuple[Array, Metrics]: ...


_LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator adding a loss to the registry under `name` (a second loss with the same name is an error)."""

    def add(fn: LossFn) -> LossFn:
        if name in _LOSSES:
            raise ValueError(f"register_loss: a loss named {name!r} is already registered")
        _LOSSES[name] = fn
        return fn

    return add


def get_loss(name: str) -> LossFn:
    """The registered loss called `name`; unknown names raise with the list of known ones."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered losses: {sorted(_LOSSES)}")
    return _LOSSES[name]


def _seq_mean(x: Array, mask: Array) -> Array:
    """Masked mean over tokens per sequence, [B, T] -> [B]; a fully masked row gives 0, not NaN."""
    return jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def _token_loss(
    logp: Array,
    old_logp: Array | None,
    ref_logp: Array | None,
    advantages: Array,
    mask: Array,
    epsilon: float,
    epsilon_high: float | None,
    beta: float,
    sequence_ratio: bool = False,
) -> tuple[Array, Array, Metrics]:
    """Per-token `-min(ratio*A, clip(ratio, 1-eps, 1+eps_high)*A) + beta*k3`, the float mask, and masked metrics.

    `old = stop_gradient(logp)` when `old_logp` is None (num_iterations == 1). `sequence_ratio` uses one ratio per
    sequence, `exp(masked mean_t(logp - old))` (GSPO). `clip_ratio` is VLM-R1's count of tokens with
    `ratio*A < clipped*A` (ratio out of range on the side where the min keeps the unclipped term);
    `clip_active_ratio` counts the tokens whose gradient the clip removes (`clipped*A < ratio*A`).
    """
    if logp.ndim != 2 or mask.shape != logp.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"loss: need logp [B, T], mask [B, T], advantages [B]; got {logp.shape}, {mask.shape}, {advantages.shape}"
        )
    mask = mask.astype(logp.dtype)
    log_ratio = logp - (jax.lax.stop_gradient(logp) if old_logp is None else old_logp)
    if sequence_ratio:
        log_ratio = jnp.broadcast_to(_seq_mean(log_ratio, mask)[:, None], logp.shape)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + eps_high)
    adv = advantages[:, None]
    objective, clipped_objective = ratio * adv, clipped * adv
    per_token = -jnp.minimum(objective, clipped_objective)
    n_tokens = jnp.maximum(jnp.sum(mask), 1.0)
    metrics = {
        "clip_ratio": jnp.sum((objective < clipped_objective) * mask) / n_tokens,
        "clip_active_ratio": jnp.sum((clipped_objective < objective) * mask) / n_tokens,
        "ratio_mean": jnp.sum(ratio * mask) / n_tokens,
    }
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError(f"loss: beta={beta} needs ref_logp (pass beta=0 to train without a reference model)")
        delta = ref_logp - logp
        kl = jnp.exp(delta) - delta - 1.0  # k3 estimator of KL(policy || reference)
        per_token = per_token + beta * kl
        metrics["kl"] = jnp.mean(_seq_mean(kl, mask))
    return per_token, mask, jax.tree.map(jax.lax.stop_gradient, metrics)


@register_loss("grpo")
def grpo_loss(
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
    """VLM-R1's compute_loss: clipped per-token ratio loss + beta*k3, masked mean per sequence, then batch mean.

    logp/old_logp/ref_logp: [B, T] float32 token log-probs of the policy, the rollout policy and the reference.
    Pass `old_logp=None` when num_iterations == 1: it then is `stop_gradient(logp)` (ratio 1, gradient -A).
    `ref_logp` may be None when `beta == 0` (no KL term, no `kl` metric). advantages: [B]; mask: [B, T] (0/1).
    `epsilon_high=None` means a symmetric clip. `max_completion_length` is used by `dr_grpo` only.
    Returns `(loss, metrics)`; dividing by gradient-accumulation steps is the caller's job.
    """
    per_token, mask, metrics = _token_loss(logp, old_logp, ref_logp, advantages, mask, epsilon, epsilon_high, beta)
    return jnp.mean(_seq_mean(per_token, mask)), metrics


@register_loss("dapo")
def dapo_loss(
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
    """DAPO token-level loss: the `grpo` per-token loss averaged over all valid tokens of the batch.

    Long completions weigh more than under `grpo`. Arguments as in `grpo_loss`.
    """
    per_token, mask, metrics = _token_loss(logp, old_logp, ref_logp, advantages, mask, epsilon, epsilon_high, beta)
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0), metrics


@register_loss("dr_grpo")
def dr_grpo_loss(
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
    """Dr.GRPO: sum of the masked per-token loss over the batch / (B * max_completion_length), a constant.

    `max_completion_length` defaults to T (the padded completion length). Pair with
    `group_advantages(scale_rewards=False)` for the full Dr.GRPO recipe. Other arguments as in `grpo_loss`.
    """
    per_token, mask, metrics = _token_loss(logp, old_logp, ref_logp, advantages, mask, epsilon, epsilon_high, beta)
    length = logp.shape[1] if max_completion_length is None else max_completion_length
    return jnp.sum(per_token * mask) / (logp.shape[0] * length), metrics


@register_loss("gspo")
def gspo_loss(
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
    """GSPO, sequence variant (the paper's main objective, not GSPO-token): one ratio per sequence.

    `s_i = exp(masked mean_t(logp - old_logp))`, loss_i = `-min(s_i*A_i, clip(s_i, 1-eps, 1+eps_high)*A_i)`
    + `beta *` masked mean_t of k3, then the mean over sequences. The paper uses a far smaller epsilon
    (3e-4 / 4e-4) than token-level GRPO. Metrics `clip_ratio`/`ratio_mean` are token-weighted over sequences.
    Arguments as in `grpo_loss`.
    """
    per_token, mask, metrics = _token_loss(
        logp, old_logp, ref_logp, advantages, mask, epsilon, epsilon_high, beta, sequence_ratio=True
    )
    return jnp.mean(_seq_mean(per_token, mask)), metrics
