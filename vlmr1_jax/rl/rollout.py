"""The RL data contract and the rollout that fills it: sample -> decode -> score -> advantages -> reference
log-probs -> a `TrainExample` for the jitted GRPO step.

`Rollout` (what the sampler returns) and `TrainExample` (what the step consumes) are frozen dataclasses registered as
JAX pytrees. An optional field is None when its run does not need it (`ref_logprobs` with beta = 0, `old_logprobs`
with num_iterations = 1): None is an empty subtree, so under jit its absence is part of the static structure.
`rollout` is a pure function of its injected parts (generate, reference log-probs, decode, rewards, advantages),
so it runs without a trainer, a model or a tokenizer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.models.processor import PromptBatch

Prompts = dict[str, jax.Array]  # `PromptBatch.arrays()` on the devices: P prompts
GenerateFn = Callable[[Prompts, jax.Array], "Rollout"]  # (prompts, key) -> G samples per prompt
LogprobFn = Callable[[Prompts, jax.Array, jax.Array], jax.Array]  # (prompts, tokens, mask) -> [B, T]
DecodeFn = Callable[..., list[str]]  # completion token ids (through EOS) -> texts
RewardFn = Callable[..., Sequence[float]]  # (completions, **columns) -> one score per completion
AdvantageFn = Callable[[np.ndarray], tuple[jax.Array, jax.Array]]  # rewards [B] -> (advantages [B], group std [P])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
    """G sampled completions for each of P prompts, B = P * G rows (row p*G+g = sample g of prompt p)."""

    tokens: jax.Array  # [B, T] int32, pad after the first EOS
    logprobs: jax.Array  # [B, T] float32: the sampling policy's log p(token), 0 where mask is 0
    mask: jax.Array  # [B, T] int32: 1 through the first EOS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainExample:
    """One GRPO step's input: P prompts, their B = P * G completions, and what the loss needs about them."""

    prompts: Prompts  # PromptBatch arrays of the P prompts
    tokens: jax.Array  # [B, T] int32
    mask: jax.Array  # [B, T] int32
    advantages: jax.Array | np.ndarray  # [B] float32 (a host array: every process holds the same global values)
    ref_logprobs: jax.Array | None = None  # [B, T] float32 of the frozen reference; None when beta == 0
    old_logprobs: jax.Array | None = None  # [B, T] float32 of the sampling policy; None when num_iterations == 1


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The next prompts, ready for a rollout: their samples, encoded on the host, and transferred to the devices."""

    samples: list[Sample]
    batch: PromptBatch  # host arrays and image grids
    prompts: Prompts  # `batch.arrays()`, sharded over the mesh


@dataclasses.dataclass(frozen=True)
class Scored:
    """The host side of a rollout: decoded completions, their rewards and advantages, and how long it took."""

    completions: list[str]  # [B]
    rewards: np.ndarray  # [B] float32, sum over the reward functions
    per_reward: dict[str, np.ndarray]  # metric name (the reward function's __name__) -> [B] float32
    advantages: np.ndarray  # [B] float32
    group_std: np.ndarray  # [P] float32, each group's reward std
    lengths: np.ndarray  # [B] completion tokens through the first EOS
    sample_seconds: float
    score_seconds: float

    def metrics(self) -> dict[str, float]:
        """The per-step rollout metrics with VLM-R1's names: `rewards/<name>` for each `per_reward` name."""
        return {
            "completion_length": float(self.lengths.mean()),
            **{f"rewards/{name}": float(v.mean()) for name, v in self.per_reward.items()},
            "reward": float(self.rewards.mean()),
            "reward_std": float(self.group_std.mean()),
            "time/sample": self.sample_seconds,
            "time/score": self.score_seconds,
            "tokens_per_second": float(self.lengths.sum()) / max(self.sample_seconds, 1e-9),
        }


def score(
    completions: list[str], columns: Mapping[str, list[Any]], reward_fns: Mapping[str, RewardFn]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each reward function's scores (keyed as `reward_fns`), and their sum per completion (VLM-R1: unit weights).

    Every function gets `completions` and every column as keywords (`train.setup.columns_for`: the jsonl fields,
    the derived columns and `prompts`), one value per completion.
    """
    per_fn = {}
    for name, fn in reward_fns.items():
        values = np.asarray(fn(completions, **columns), np.float32)
        if values.shape != (len(completions),):
            raise ValueError(
                f"reward {name!r} returned shape {values.shape} for {len(completions)} completions; "
                f"a reward function must return one float per completion"
            )
        per_fn[name] = values
    return np.sum(list(per_fn.values()), axis=0), per_fn


def rollout(
    prompts: Prompts,
    key: jax.Array,
    *,
    generate: GenerateFn,
    decode: DecodeFn,
    reward_fns: Mapping[str, RewardFn],
    columns: Mapping[str, list[Any]],
    advantage_fn: AdvantageFn,
    ref_logprob_fn: LogprobFn | None = None,
    keep_old_logprobs: bool = False,
    fetch: Callable[[jax.Array], np.ndarray] = np.asarray,
) -> tuple[TrainExample, Scored]:
    """Sample, decode and score G completions per prompt, and assemble the step's input.

    `reward_fns`: {metric name: function} (`rewards.reward_functions`); `columns`: the reward keyword columns, one
    entry per completion. `ref_logprob_fn` None: no reference (beta = 0).
    `keep_old_logprobs`: keep the sampler's log-probs as the old policy (num_iterations > 1). `fetch` brings a
    global device array to this host (`train.setup.to_host` across processes).
    """
    start = time.perf_counter()
    sampled = generate(prompts, key)
    tokens, mask = fetch(sampled.tokens), fetch(sampled.mask)
    sampled_at = time.perf_counter()
    completions = decode([row[m.astype(bool)] for row, m in zip(tokens, mask)])
    rewards, per_reward = score(completions, columns, reward_fns)
    device_advantages, group_std = advantage_fn(rewards)
    advantages = np.asarray(device_advantages)  # host value: every process passes the same global array
    scored = Scored(
        completions,
        rewards,
        per_reward,
        advantages,
        np.asarray(group_std),
        mask.sum(1),
        sampled_at - start,
        time.perf_counter() - sampled_at,
    )
    example = TrainExample(
        prompts,
        sampled.tokens,
        sampled.mask,
        advantages,
        ref_logprobs=None if ref_logprob_fn is None else ref_logprob_fn(prompts, sampled.tokens, sampled.mask),
        old_logprobs=sampled.logprobs if keep_old_logprobs else None,
    )
    return example, scored
