"""`accuracy`: VLM-R1's `accuracy_reward`, dispatching per sample on `accu_reward_method`."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any

from Levenshtein import ratio

from vlmr1_jax.rewards.choice import extract_choice, mcq_score, yes_no_score
from vlmr1_jax.rewards.common import aligned, clean_text, first_answer, last_answer, score_samples
from vlmr1_jax.rewards.detection import map_score, od_score, weighted_sum_score
from vlmr1_jax.rewards.llm_judge import Judge, judge_from_env, llm_score
from vlmr1_jax.rewards.math_answer import math_score, verify_equal
from vlmr1_jax.rewards.registry import register_reward

_DIGIT = re.compile(r"\d")
_log = logging.getLogger(__name__)


def default_accuracy_score(content: str, solution: str) -> float:
    """VLM-R1 `default_accuracy_reward`: math_verify, else numbers by float equality (Levenshtein ratio when the
    answer is not a number), else choice letters, else the Levenshtein ratio (continuous in [0, 1])."""
    truth = first_answer(solution, one_line=True)
    truth = truth.strip() if truth is not None else solution.strip()
    answer = last_answer(content)
    answer = answer.strip() if answer is not None else content.strip()
    if verify_equal(answer, truth):
        return 1.0
    if _DIGIT.search(truth):
        try:
            return 1.0 if float(clean_text(answer)) == float(clean_text(truth)) else 0.0
        except (ValueError, OverflowError):
            return ratio(clean_text(answer), clean_text(truth))
    truth_choice = extract_choice(truth)
    if truth_choice:
        return 1.0 if extract_choice(answer) == truth_choice.upper() else 0.0
    return ratio(clean_text(answer), clean_text(truth))


def all_match_score(content: str, solution: str) -> float:
    """1.0 iff `clean_text` of both sides are equal (VLM-R1 uses it for GUI)."""
    return 1.0 if clean_text(content) == clean_text(solution) else 0.0


def _methods(judge: Judge | None, vlmr1_compat: bool) -> dict[str, Callable[[str, str], float]]:
    return {
        "mcq": mcq_score,
        "yes_no": yes_no_score,
        "llm": functools.partial(llm_score, judge=judge),
        "map": map_score,
        "math": math_score,
        "weighted_sum": functools.partial(weighted_sum_score, vlmr1_compat=vlmr1_compat),
        "od_ap": od_score,
        "od_ap50": functools.partial(od_score, ap50=True),
        "odLength": functools.partial(od_score, length_penalty=True),
        "all_match": all_match_score,
        "default": default_accuracy_score,
    }


@register_reward("accuracy")
def accuracy_reward(
    completions: list[str],
    *,
    solution: list[str] | None = None,
    accu_reward_method: list[str] | None = None,
    llm_judge: Judge | None = None,
    vlmr1_compat: bool = False,
    **columns: Any,
) -> list[float]:
    """Per-sample accuracy in [0, 1] by `accu_reward_method` (absent: `default`; unknown names: `default`, as VLM-R1).

    `llm_judge(student_answer, ground_truth) -> float` overrides the judge configured by `VLMR1_LLM_JUDGE_URL`;
    `vlmr1_compat` keeps VLM-R1's stale-label bug in `weighted_sum`.
    """
    n = len(completions)
    solutions = aligned(solution, "solution", n, required=True)
    methods = aligned(accu_reward_method, "accu_reward_method", n, default="default")
    table = _methods(llm_judge if llm_judge is not None else judge_from_env(), vlmr1_compat)
    for name in set(methods) - set(table):
        _log.warning("unknown accu_reward_method %r: using 'default'", name)
    return score_samples(
        lambda i: table.get(methods[i], table["default"])(completions[i], solutions[i]),
        n,
        aligned(columns.get("id"), "id", n),
    )
