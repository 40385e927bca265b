"""Accuracy method `llm`: an optional OpenAI-compatible judge; without one (or on any judge error) exact match.

Off by default. Set `VLMR1_LLM_JUDGE_URL` (e.g. `http://localhost:11434/v1`) to turn the HTTP judge on;
`VLMR1_LLM_JUDGE_MODEL` (default `qwen2.5:7b`, VLM-R1's) and `VLMR1_LLM_JUDGE_API_KEY` (else `OPENAI_API_KEY`)
are optional. Or pass any `judge(student_answer, ground_truth) -> float` as the reward option `llm_judge`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import urllib.request
from collections.abc import Callable

from vlmr1_jax.rewards.common import first_answer, last_answer

Judge = Callable[[str, str], float]

DEFAULT_MODEL = "qwen2.5:7b"
_INSTRUCTION = (
    "You grade answers. Find the final answer in the student's response and compare it with the reference "
    "solution. Reply with exactly '1.0' if they agree in meaning, or '0.0' if they disagree or the response has "
    "no clear answer. Reply with nothing else."
)
_log = logging.getLogger(__name__)


def http_judge(base_url: str, model: str = DEFAULT_MODEL, api_key: str | None = None, timeout_s: float = 60.0) -> Judge:
    """A judge that POSTs to `{base_url}/chat/completions` (temperature 0) and reads the reply as a float."""
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"

    def judge(student_answer: str, ground_truth: str) -> float:
        body = {
            "model": model,
            "temperature": 0,
            "messages": [
                {"role": "user", "content": _INSTRUCTION},
                {
                    "role": "user",
                    "content": f"Student's response: {student_answer}\nCorrect solution: "
                    f"{ground_truth}\nOutput only 1.0 or 0.0:",
                },
            ],
        }
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            reply = json.load(response)
        return float(reply["choices"][0]["message"]["content"].strip())

    return judge


def judge_from_env() -> Judge | None:
    """The HTTP judge configured by `VLMR1_LLM_JUDGE_*` environment variables, or None when unset."""
    base_url = os.environ.get("VLMR1_LLM_JUDGE_URL")
    if not base_url:
        return None
    return http_judge(
        base_url,
        os.environ.get("VLMR1_LLM_JUDGE_MODEL", DEFAULT_MODEL),
        os.environ.get("VLMR1_LLM_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
    )


def llm_score(content: str, solution: str, judge: Judge | None = None) -> float:
    """Judge's verdict on (last answer of `content`, first answer of `solution`), clipped to [0, 1].

    With no judge, or when it fails or answers something that is not a finite number, 1.0 iff the stripped
    answers are equal: VLM-R1's fallback.
    """
    truth = first_answer(solution, one_line=True)
    truth = truth.strip() if truth is not None else solution.strip()
    answer = last_answer(content)
    answer = answer.strip() if answer is not None else content.strip()
    exact = 1.0 if answer == truth else 0.0
    if judge is None:
        return exact
    try:
        verdict = float(judge(answer, truth))
    except Exception as err:  # noqa: BLE001 -- network, HTTP, a reply that is not a number
        _log.warning("llm judge failed (%s); using exact match", err)
        return exact
    return min(1.0, max(0.0, verdict)) if math.isfinite(verdict) else exact
