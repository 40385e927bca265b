"""Helpers shared by the VLM-R1 rewards: answer-tag extraction, `clean_text`, the +-1 IoU, box and column checks.

Everything here follows VLM-R1 exactly; model output that does not parse yields None or 0, never an error.
Tags are found with `str.find`, in time linear in the text: VLM-R1's `<answer>(.*?)</answer>` regexes restart the
lazy scan at every opening tag, which is quadratic on a completion of repeated unclosed tags.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

_NEWLINE_AFTER_SPACE = {c: re.compile(r"(?<=\s)" + re.escape(c)) for c in ("\n", "\r")}
_NEWLINE_AFTER_OTHER = {c: re.compile(r"(?<!\s)" + re.escape(c)) for c in ("\n", "\r")}

Box = tuple[float, float, float, float]


class RewardInputError(ValueError):
    """A dataset column (ground truth, image size, grid) a reward cannot read: a data problem, not the model's."""


def first_between(text: str, open_tag: str, close_tag: str, *, one_line: bool = False) -> str | None:
    """`re.search(open(.*?)close, text, DOTALL).group(1)` (without DOTALL if `one_line`), in linear time, or None.

    The first opening tag with a closing tag after it is the first opening tag (a later one has less text after
    it); without DOTALL, the first such pair within one line.
    """
    start = 0
    while (begin := text.find(open_tag, start)) >= 0:
        begin += len(open_tag)
        line_end = text.find("\n", begin) if one_line else -1
        end = text.find(close_tag, begin, len(text) if line_end < 0 else line_end)
        if end >= 0:
            return text[begin:end]
        if line_end < 0:
            return None
        start = line_end + 1
    return None


def last_between(text: str, open_tag: str, close_tag: str) -> str | None:
    """`re.findall(open(.*?)close, text, DOTALL)[-1]` in linear time, or None: non-overlapping pairs, left to right."""
    found, start = None, 0
    while (begin := text.find(open_tag, start)) >= 0:
        begin += len(open_tag)
        end = text.find(close_tag, begin)
        if end < 0:
            break
        found, start = (begin, end), end + len(close_tag)
    return text[found[0] : found[1]] if found else None


def first_answer(text: str, *, one_line: bool = False) -> str | None:
    """Inner text of the first `<answer>...</answer>` (DOTALL unless `one_line`), or None.

    VLM-R1 reads most ground truths without DOTALL: an answer spanning lines does not match there.
    """
    return first_between(text, ANSWER_OPEN, ANSWER_CLOSE, one_line=one_line)


def last_answer(text: str) -> str | None:
    """Inner text of the last `<answer>...</answer>` (DOTALL), or None."""
    return last_between(text, ANSWER_OPEN, ANSWER_CLOSE)


def clean_text(text: str) -> str:
    """VLM-R1 `clean_text`: the last answer if tagged; a newline after whitespace is dropped, any other becomes a
    space; then strip, rstrip('.') and lowercase."""
    answer = last_answer(text)
    if answer is not None:
        text = answer
    for char in ("\n", "\r"):
        text = _NEWLINE_AFTER_SPACE[char].sub("", text)
        text = _NEWLINE_AFTER_OTHER[char].sub(" ", text)
    return text.strip().rstrip(".").lower()


def as_box(value: Any) -> Box | None:
    """First four entries of a JSON list as finite floats `[x1, y1, x2, y2]`, or None when they are not numbers."""
    if not isinstance(value, (list, tuple)) or len(value) < 4:
        return None
    try:
        box = tuple(float(v) for v in value[:4] if isinstance(v, (int, float)))
    except OverflowError:  # a JSON integer too large for a float
        return None
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        return None
    return box


def iou(box1: Sequence[float], box2: Sequence[float]) -> float:
    """VLM-R1 IoU with the +-1 pixel convention: an overlap of width or height <= 1 counts as 0.

    Equal to continuous IoU otherwise. VLM-R1 divides by a zero union (its callers then score 0); here that, and
    any non-finite result, gives 0.0. Float rounding is clipped so the value stays in [0, 1].
    """
    ax1, ay1, ax2, ay2 = box1[:4]
    bx1, by1, bx2, by2 = box2[:4]
    ix1, iy1 = max(ax1, bx1), max(ay1, by1)
    ix2, iy2 = min(ax2 - 1, bx2 - 1), min(ay2 - 1, by2 - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if (ix1 < ix2 and iy1 < iy2) else 0
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    if union == 0:
        return 0.0
    value = float(inter) / union
    return min(1.0, max(0.0, value)) if math.isfinite(value) else 0.0


def aligned(values: Sequence[Any] | None, name: str, n: int, *, default: Any = None, required: bool = False) -> list:
    """Column `name` as a list of `n` per-sample values; `default` per sample when absent (error if `required`)."""
    if values is None:
        if required:
            raise RewardInputError(f"this reward needs the column {name!r}")
        return [default] * n
    values = list(values)
    if len(values) != n:
        raise RewardInputError(f"column {name!r} has {len(values)} values for {n} completions")
    return values


def score_samples(score: Callable[[int], float], n: int, ids: Sequence[Any] | None = None) -> list[float]:
    """`[score(i) for i in range(n)]` as floats; a RewardInputError is re-raised naming the sample (and its id)."""
    out = []
    for i in range(n):
        try:
            out.append(float(score(i)))
        except RewardInputError as err:
            where = f"sample {i}" + (f" (id={ids[i]!r})" if ids is not None and ids[i] is not None else "")
            raise RewardInputError(f"{where}: {err}") from None
    return out
