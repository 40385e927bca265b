"""The rollout contract (vlmr1_jax.rl.rollout) with injected parts: no trainer, model or tokenizer.

References: numpy written from the formulas (VLM-R1's group advantages with torch.std's N-1 std, reward sums, the
logged metrics) on hand-made completions; the pytree structure of `TrainExample` under jit.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmr1_jax.rl.grpo import group_advantages
from vlmr1_jax.rl.rollout import Rollout, TrainExample, rollout, score

P, G, T = 2, 3, 5
PAD = 0
# Tokens per row, EOS = 9; rows of a group differ in length, so rewards differ within each group.
TOKENS = np.array(
    [
        [1, 2, 9, PAD, PAD],
        [3, 9, PAD, PAD, PAD],
        [4, 5, 6, 7, 8],
        [1, 9, PAD, PAD, PAD],
        [2, 3, 4, 9, PAD],
        [5, 6, 9, PAD, PAD],
    ],
    np.int32,
)
MASK = np.array(
    [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], np.int32
)
LOGPROBS = (-0.5 - np.arange(P * G * T, dtype=np.float32).reshape(P * G, T) / 100) * MASK
SOLUTIONS = ["3", "4"]


def decode(rows: list[np.ndarray]) -> list[str]:
    return [" ".join(str(t) for t in row) for row in rows]


def length_reward(completions, **columns):
    return [float(len(c.split())) for c in completions]


def match_reward(completions, solution, **columns):
    """1 when the completion contains its solution's digit (a column reward, as VLM-R1's accuracy)."""
    return [float(s in c.split()) for c, s in zip(completions, solution)]


REWARDS = {"length": length_reward, "match": match_reward}
COLUMNS = {"solution": [s for s in SOLUTIONS for _ in range(G)]}


class FakeSampler:
    """A `generate` returning fixed completions; records what it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, key):
        self.calls.append((prompts, key))
        return Rollout(tokens=jnp.asarray(TOKENS), logprobs=jnp.asarray(LOGPROBS), mask=jnp.asarray(MASK))


def fake_ref_logprobs(prompts, tokens, mask):
    return -tokens.astype(jnp.float32) * mask / 10


def run(**kwargs):
    sampler = FakeSampler()
    prompts = {"input_ids": jnp.ones((P, 4), jnp.int32)}
    parts = dict(
        generate=sampler,
        decode=decode,
        reward_fns=REWARDS,
        columns=COLUMNS,
        advantage_fn=functools.partial(group_advantages, group_size=G),
    )
    example, scored = rollout(prompts, jax.random.key(7), **{**parts, **kwargs})
    return sampler, prompts, example, scored


def expected_rewards() -> tuple[np.ndarray, np.ndarray]:
    """(length, match) per row, from the token ids through EOS."""
    words = [[str(t) for t in TOKENS[r][MASK[r] == 1]] for r in range(P * G)]
    return (
        np.array([len(w) for w in words], np.float64),
        np.array([SOLUTIONS[r // G] in words[r] for r in range(P * G)], np.float64),
    )


def test_rollout_scores_decoded_completions_and_assembles_the_example():
    sampler, prompts, example, scored = run(ref_logprob_fn=fake_ref_logprobs, keep_old_logprobs=True)
    assert len(sampler.calls) == 1 and sampler.calls[0][0] is prompts
    assert scored.completions == ["1 2 9", "3 9", "4 5 6 7 8", "1 9", "2 3 4 9", "5 6 9"]  # through the first EOS

    lengths, match = expected_rewards()
    np.testing.assert_allclose(scored.per_reward["length"], lengths)
    np.testing.assert_allclose(scored.per_reward["match"], match)
    assert match.sum() >= 1 and (match == 0).any()  # the column reward sees its own row's solution
    rewards = (lengths + match).reshape(P, G)
    std = rewards.std(axis=1, ddof=1)
    advantages = ((rewards - rewards.mean(1, keepdims=True)) / (std[:, None] + 1e-4)).reshape(-1)
    np.testing.assert_allclose(scored.rewards, rewards.reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(scored.advantages, advantages, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scored.group_std, std, rtol=1e-6)

    assert example.prompts is prompts
    np.testing.assert_array_equal(example.tokens, TOKENS)
    np.testing.assert_array_equal(example.mask, MASK)
    np.testing.assert_allclose(example.advantages, advantages, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(example.ref_logprobs, -TOKENS * MASK / 10, rtol=1e-6)
    np.testing.assert_array_equal(example.old_logprobs, LOGPROBS)

    metrics = scored.metrics()
    assert metrics["completion_length"] == pytest.approx(MASK.sum() / (P * G))
    assert metrics["rewards/length"] == pytest.approx(lengths.mean())
    assert metrics["rewards/match"] == pytest.approx(match.mean())
    assert metrics["reward"] == pytest.approx(rewards.mean())
    assert metrics["reward_std"] == pytest.approx(std.mean(), rel=1e-6)
    assert metrics["tokens_per_second"] == pytest.approx(MASK.sum() / metrics["time/sample"])


def test_optional_fields_are_none_when_the_run_does_not_need_them():
    _, _, example, _ = run()  # beta = 0, num_iterations = 1
    assert example.ref_logprobs is None and example.old_logprobs is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        example.tokens = None


def test_reward_of_the_wrong_length_is_named():
    with pytest.raises(ValueError, match="reward 'short' returned shape \\(2,\\) for 6 completions"):
        score(["a"] * 6, COLUMNS, {"short": lambda completions, **_: [0.0, 1.0]})


def test_absent_fields_are_static_structure_under_jit():
    """None is an empty subtree: jit sees a different structure (its own program), never a traced None."""
    full = TrainExample(
        {"input_ids": jnp.ones((P, 4), jnp.int32)},
        jnp.asarray(TOKENS),
        jnp.asarray(MASK),
        np.arange(P * G, dtype=np.float32),
        ref_logprobs=jnp.asarray(LOGPROBS),
        old_logprobs=jnp.asarray(2 * LOGPROBS),
    )
    bare = dataclasses.replace(full, ref_logprobs=None, old_logprobs=None)
    assert len(jax.tree.leaves(full)) == len(jax.tree.leaves(bare)) + 2
    assert jax.tree.structure(full) != jax.tree.structure(bare)
    traces = []

    @jax.jit
    def total(example: TrainExample) -> jax.Array:
        traces.append(example.ref_logprobs is None)
        extra = 0.0 if example.ref_logprobs is None else example.ref_logprobs.sum() + example.old_logprobs.sum()
        return example.advantages.sum() + (example.tokens * example.mask).sum() + extra

    base = np.arange(P * G).sum() + (TOKENS * MASK).sum()
    np.testing.assert_allclose(total(bare), base)
    np.testing.assert_allclose(total(full), base + 3 * LOGPROBS.sum(), rtol=1e-6)
    np.testing.assert_allclose(total(bare), base)
    assert traces == [True, False]  # one trace per structure, reused afterwards
