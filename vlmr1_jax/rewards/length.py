"""`length` (cosine length reward, arXiv 2502.03373) and `repetition` (n-gram repetition penalty)."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from typing import Any, Literal

from vlmr1_jax.rewards import sandbox
from vlmr1_jax.rewards.common import aligned, first_between, score_samples
from vlmr1_jax.rewards.detection import FENCE, JSON_OPEN, weighted_sum_score
from vlmr1_jax.rewards.registry import register_reward

COSINE_MAX_LEN = 1024
CORRECT_THRESHOLD = 0.7
TEXT_NGRAM = 6
# json_repair is quadratic on some shapes ('["' * 4096 takes 0.5 s, * 16384 10 s); a truncated box list repairs in
# about 1 us per char. Longer JSON is not repaired, and a repair over the time limit (run by `sandbox`) fails.
REPAIR_MAX_CHARS = 16384
REPAIR_SECONDS = 1.0
_log = logging.getLogger(__name__)


def cosine_score(length: int, correct: bool, max_len: int = COSINE_MAX_LEN) -> float:
    """Cosine schedule: correct 1.0 (empty) -> 0.5 (`max_len`); wrong -0.5 -> 0.0. Periodic beyond `max_len`,
    as in VLM-R1 (the length is not clamped)."""
    at_zero, at_max = (1.0, 0.5) if correct else (-0.5, 0.0)
    return at_zero - (at_zero - at_max) * (1 - math.cos(length * math.pi / max_len)) / 2


def byte_length(content: str) -> int:
    """Token count estimate of `count="bytes"`: UTF-8 bytes / 4, rounded up (a rough BPE estimate)."""
    return -(-len(content.encode("utf-8")) // 4)


@register_reward("length")
def cosine_rewards(
    completions: list[str],
    *,
    solution: list[str] | None = None,
    tokenizer: Any = None,
    count: Literal["tokens", "bytes"] = "tokens",
    length_fn: Callable[[str], int] | None = None,
    max_len: int = COSINE_MAX_LEN,
    vlmr1_compat: bool = False,
    **columns: Any,
) -> list[float]:
    """Cosine length reward in [-0.5, 1.0]; correct means `weighted_sum` accuracy >= 0.7 (VLM-R1 computes that).

    Length = `length_fn(text)` if given, else by `count`: "tokens" is `len(tokenizer.encode(text))` (VLM-R1
    re-encodes the decoded completion; training passes the run's tokenizer), "bytes" is `byte_length`.
    [BUG in VLM-R1] the accuracy is overwritten with 1.0, so every completion takes the "correct" branch;
    `vlmr1_compat=True` reproduces that (and then needs no `solution`).
    """
    n = len(completions)
    solutions = aligned(solution, "solution", n, required=not vlmr1_compat)
    if length_fn is None:
        length_fn = _counter(count, tokenizer)

    def score(i: int) -> float:
        correct = vlmr1_compat or weighted_sum_score(completions[i], solutions[i]) >= CORRECT_THRESHOLD
        return cosine_score(length_fn(completions[i]), correct, max_len)

    return score_samples(score, n, aligned(columns.get("id"), "id", n))


def _counter(count: str, tokenizer: Any) -> Callable[[str], int]:
    """The length function of `count`; "tokens" without a tokenizer is an error, not a silent byte estimate."""
    if count == "bytes":
        return byte_length
    if count != "tokens":
        raise ValueError(f"length reward: count={count!r}; expected 'tokens' or 'bytes'")
    if tokenizer is None:
        raise ValueError(
            "length reward: count='tokens' needs the tokenizer, which training passes (elsewhere pass "
            "tokenizer=...); or set the option count='bytes' for the UTF-8 bytes / 4 estimate"
        )
    return lambda text: len(tokenizer.encode(text))


_ARRAY_START = re.compile(r"\[\s*\{")
_ARRAY_END = re.compile(r"\}\s*\]")


def find_box_array(content: str) -> str | None:
    r"""`re.search(r'\[\s*{.*?"bbox_2d".*?"label".*?}\s*\]', content, re.DOTALL)`'s match, in linear time.

    The regex takes tens of seconds on a truncated repetitive box list. Its match starts at the first `[{`
    (if that start fails, every later one does) and ends at the first `}\s*]` after the first `"bbox_2d"`
    and then `"label"`.
    """
    start = _ARRAY_START.search(content)
    key = content.find('"bbox_2d"', start.end()) if start else -1
    label = content.find('"label"', key + len('"bbox_2d"')) if key >= 0 else -1
    end = _ARRAY_END.search(content, label + len('"label"')) if label >= 0 else None
    return content[start.start() : end.end()] if start and end else None


def _json_candidate(content: str) -> str | None:
    """First ```json block; else the first ``` block; else a bare `[{..."bbox_2d"..."label"...}]` array."""
    fenced = first_between(content, JSON_OPEN, FENCE)
    if fenced is not None:
        return fenced.strip()
    fenced = first_between(content, FENCE, FENCE)
    return (fenced.strip() if fenced is not None else None) or find_box_array(content)


def _load_json(text: str) -> Any:
    """`json.loads`, else `json.loads(json_repair.repair_json(text))` within `REPAIR_MAX_CHARS` and
    `REPAIR_SECONDS`, else None."""
    try:
        return json.loads(text)
    except Exception:  # noqa: BLE001 -- not JSON as it stands: try the repair below
        pass
    if len(text) > REPAIR_MAX_CHARS:
        return None
    try:
        repaired = sandbox.call("repair_json", text, seconds=REPAIR_SECONDS)
    except sandbox.SandboxTimeout as err:
        _log.warning("json_repair gave up (%s) on %d chars: not JSON", err, len(text))
        return None
    try:
        return json.loads(repaired)
    except Exception:  # noqa: BLE001 -- None (repair_json raised), or still not JSON
        return None


def _penalty(items: list) -> float:
    """-(1 - unique / total), in [-1, 0]."""
    return -(1.0 - len(set(items)) / len(items))


def repetition_score(content: str) -> float:
    """VLM-R1 `repetition_reward` in [-1, 0]: duplicate boxes in a JSON box list, else duplicate word 6-grams.

    A non-empty JSON list scores its `f"{bbox_2d}_{label}"` items (0.0 with none); entries that are not dicts with
    both keys are skipped (VLM-R1 crashes on non-dict entries). Otherwise lowercased whitespace words;
    fewer than 6 words score 0.0.
    """
    if not content:
        return 0.0
    candidate = _json_candidate(content)
    data = _load_json(candidate) if candidate else None
    if data and isinstance(data, list):
        boxes = [e for e in data if isinstance(e, dict) and "bbox_2d" in e and "label" in e]
        try:
            items = [f"{e['bbox_2d']}_{e['label']}" for e in boxes]
        except RecursionError:  # absurdly nested values
            return 0.0
        return _penalty(items) if items else 0.0
    words = content.lower().split()
    if len(words) < TEXT_NGRAM:
        return 0.0
    return _penalty(list(zip(*(words[k:] for k in range(TEXT_NGRAM)))))


@register_reward("repetition")
def repetition_rewards(completions: list[str], **columns: Any) -> list[float]:
    """Repetition penalty per completion, in [-1, 0] (0 = no repetition)."""
    return [repetition_score(content) for content in completions]
