"""Grouped sampler: encode each prompt's images and prefill it once (`rl/prefix.py`), share its KV cache with its G
samples (stored once, not copied per row), and decode in one compiled `while_loop` that stops as soon as every row
has produced an EOS. With top-k, each step sorts and samples the k largest logits only.

VLM-R1 samples with HF `generate` defaults: temperature 1.0, top_k 50, top_p 1.0 (docs/facts.md: Sampling); those are
the defaults here. Returned log-probs are the policy's own (log_softmax of the raw logits, no temperature or
filtering), i.e. what the GRPO step computes, so they serve as old log-probs when num_iterations > 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlmr1_jax.config import SamplingConfig
from vlmr1_jax.models.family import VisionLanguageModel, processor_of
from vlmr1_jax.models.layers import unstack_layers
from vlmr1_jax.rl.grpo import completion_mask, token_logprobs
from vlmr1_jax.rl.prefix import prefill
from vlmr1_jax.rl.rollout import Rollout


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus), as HF's logits warpers; removed entries become -inf."""
    logits = logits.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if 0 < top_k < logits.shape[-1]:
        kth = _top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, like HF's TopPLogitsWarper
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cumulative <= 1.0 - top_p
        remove_sorted = remove_sorted.at[..., -1].set(False)  # always keep the most likely token
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, neg, logits)
    return logits


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k` with each output behind its own barrier: slicing them would make XLA:CPU sort the whole row
    instead of using its TopK kernel (18 ms instead of 0.5 ms of CPU for 16 rows of 8192). One barrier over both
    outputs can be simplified into a direct user of the TopK tuple, which aborts XLA:CPU 0.10.2's compiler."""
    values, indices = jax.lax.top_k(x, k)
    return jax.lax.optimization_barrier(values), jax.lax.optimization_barrier(indices)


def next_tokens(rng: jax.Array, logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """One token per row of `logits` [B, V]: greedy, or sampled from `filter_logits`' distribution."""
    if cfg.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if 0 < cfg.top_k < logits.shape[-1]:
        return _sample_top_k(rng, logits, cfg)
    return _sample(rng, logits, cfg)


def _sample(rng: jax.Array, logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    filtered = filter_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def _sample_top_k(rng: jax.Array, logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """`_sample` drawn on the k largest logits only (no vocabulary-wide sort, filter or random draw).

    The same distribution: top-p applies to the k kept tokens in sorted order. `filter_logits` keeps every token
    tied with the k-th, and its top-p orders tied tokens by index; a batch with such a tie takes `_sample`.
    """
    k, neg = cfg.top_k, jnp.finfo(jnp.float32).min
    values, ids = _top_k(logits.astype(jnp.float32), k + 1)
    kept = values[:, :k] / cfg.temperature
    ties = values[:, k - 1 :] if cfg.top_p == 1.0 else values
    tie = jnp.any((ties[:, :-1] == ties[:, 1:]) & (ties[:, 1:] > neg))
    if cfg.top_p < 1.0:
        cumulative = jnp.cumsum(jax.nn.softmax(kept[:, ::-1], axis=-1), axis=-1)[:, ::-1]  # ascending, as HF
        remove = (cumulative <= 1.0 - cfg.top_p).at[:, 0].set(False)  # always keep the most likely token
        kept = jnp.where(remove, neg, kept)
    choice = jax.random.categorical(rng, kept, axis=-1)
    token = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.lax.cond(tie, lambda: _sample(rng, logits, cfg), lambda: token)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Static settings of one compiled sampler; call `generate` under jit (or use `jitted`)."""

    cfg: SamplingConfig
    eos_ids: tuple[int, ...]
    pad_id: int
    banned_ids: tuple[int, ...] = ()  # never sampled: image/video/vision tokens would break the re-forward
    # Slice each decoder layer's weights out of their stack once, before the decode loop. XLA:CPU copies a stacked
    # weight's slice on every pass of a loop; the copies hold a second set of the
    # decoder's weights for the whole loop, so elsewhere the stack is kept. None: on the CPU backend only.
    unstack_layers: bool | None = None

    def generate(
        self, model: VisionLanguageModel, batch: dict[str, jax.Array], rng: jax.Array, num_samples: int
    ) -> Rollout:
        """batch: `PromptBatch.arrays()` for P prompts. Returns the `Rollout` of the P*G rows (row p*G+g = sample g
        of p): tokens (pad after EOS), log-probs and mask (through the first EOS), each [B, T]."""
        cfg, steps = self.cfg, self.cfg.max_new_tokens
        first, prompt_cache, next_position = prefill(model, batch, 0)
        cache = prompt_cache.share(num_samples, steps)  # the prompt's keys once per group, not once per row
        unstack = jax.default_backend() == "cpu" if self.unstack_layers is None else self.unstack_layers
        decoder = unstack_layers(model) if unstack else model
        logits = jnp.repeat(first, num_samples, axis=0)
        next_position = jnp.repeat(next_position, num_samples, axis=0)
        rows = logits.shape[0]
        eos = jnp.asarray(self.eos_ids, jnp.int32)
        banned = jnp.zeros(logits.shape[-1], bool).at[jnp.asarray(self.banned_ids, jnp.int32)].set(True)
        ones = jnp.ones((rows, 1), jnp.int32)

        def cond(state):
            step, _, _, _, _, done, _ = state
            return (step < steps) & ~jnp.all(done)

        def body(state):
            step, cache, logits, tokens, logprobs, done, rng = state
            rng, key = jax.random.split(rng)
            allowed = jnp.where(banned, jnp.finfo(jnp.float32).min, logits) if self.banned_ids else logits
            token = jnp.where(done, self.pad_id, next_tokens(key, allowed, cfg))
            logprob = jnp.where(done, 0.0, token_logprobs(logits, token))
            tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
            logprobs = jax.lax.dynamic_update_slice(logprobs, logprob[:, None], (0, step))
            done = done | jnp.isin(token, eos)
            position = jnp.broadcast_to((next_position + step)[None, :, None], (3, rows, 1))
            hidden, cache = decoder(token[:, None], position, ones, cache=cache)
            return step + 1, cache, decoder.logits(hidden[:, 0]), tokens, logprobs, done, rng

        init = (
            jnp.zeros((), jnp.int32),
            cache,
            logits,
            jnp.full((rows, steps), self.pad_id, jnp.int32),
            jnp.zeros((rows, steps), jnp.float32),
            jnp.zeros((rows,), bool),
            rng,
        )
        _, _, _, tokens, logprobs, _, _ = jax.lax.while_loop(cond, body, init)
        mask = completion_mask(tokens, self.eos_ids)
        return Rollout(tokens=tokens, logprobs=logprobs * mask, mask=mask)

    def jitted(self, graphdef: nnx.GraphDef, num_samples: int):
        """A jitted `(state, batch, rng) -> Rollout` for a split model (`nnx.split(model)`)."""

        @jax.jit
        def run(state, batch, rng):
            return self.generate(nnx.merge(graphdef, state), batch, rng, num_samples)

        return run


def default_banned_ids(cfg, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """The family's vision placeholder / structure tokens (its processor's `vision_tokens`), which the policy must
    never emit (they would break the re-forward), and `extra`."""
    vision = processor_of(cfg).vision_tokens
    return tuple(sorted({*(getattr(cfg, field) for field in vision), *extra}))
