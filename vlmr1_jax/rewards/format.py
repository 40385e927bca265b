"""`format`: VLM-R1's generic `format_reward`; the whole completion must be think-then-answer."""

from __future__ import annotations

import re
from typing import Any

from vlmr1_jax.rewards.registry import register_reward

THINK_THEN_ANSWER = re.compile(r"</think>\s*<answer>")
_OPEN, _CLOSE = "<think>", "</answer>"


def has_think_answer_format(content: str) -> bool:
    r"""`re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", content, re.DOTALL)`, in linear time.

    The regex backtracks badly on long repetitive completions; the earliest `</think>\s*<answer>` decides the same.
    """
    if not (content.startswith(_OPEN) and content.endswith(_CLOSE)):
        return False
    bridge = THINK_THEN_ANSWER.search(content, len(_OPEN))
    return bridge is not None and bridge.end() <= len(content) - len(_CLOSE)


@register_reward("format")
def format_reward(completions: list[str], **columns: Any) -> list[float]:
    """1.0 for a completion that is exactly think-then-answer (no text before or after), else 0.0."""
    return [1.0 if has_think_answer_format(content) else 0.0 for content in completions]
