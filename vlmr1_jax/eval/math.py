"""Math evaluation: each completion scored by VLM-R1's accuracy reward under its sample's `accu_reward_method`
(`default`: math_verify, then numbers, then choice letters; `math`: math_verify, then the last `\\boxed{}`; `mcq`:
choice letters). A sample is correct when its reward is 1.0 (the Levenshtein partial credit of `default` is not)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.rewards import get_reward


def math_records(samples: Sequence[Sample], completions: Sequence[str]) -> list[dict]:
    """Per-sample records: the completion, the accuracy method, its reward and whether it is fully correct."""
    scores = get_reward("accuracy")(
        list(completions),
        solution=[s.solution for s in samples],
        accu_reward_method=[s.accu_reward_method for s in samples],
        id=[s.id for s in samples],
    )
    return [
        {
            "id": sample.id,
            "image": list(sample.image_paths),
            "problem": sample.problem,
            "solution": sample.solution,
            "completion": completion,
            "method": sample.accu_reward_method,
            "reward": float(score),
            "correct": float(score) == 1.0,
        }
        for sample, completion, score in zip(samples, completions, scores)
    ]


def summarize_math(records: Sequence[dict]) -> dict[str, Any]:
    """Accuracy in percent (reward 1.0) and the mean accuracy reward."""
    n = len(records)
    return {
        "accuracy": 100.0 * sum(r["correct"] for r in records) / max(n, 1),
        "mean_reward": sum(r["reward"] for r in records) / max(n, 1),
        "n": n,
    }
