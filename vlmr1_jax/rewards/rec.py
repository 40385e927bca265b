"""Referring-expression rewards of VLM-R1's VLM modules: `rec_iou` (`iou_reward`), `rec_format` (Qwen's
`format_reward_rec`) and `rec_format_plain` (InternVL's, whose box has no JSON braces)."""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import numpy as np
from PIL import Image

from vlmr1_jax.rewards.common import (
    Box,
    RewardInputError,
    aligned,
    as_box,
    first_answer,
    iou,
    last_answer,
    score_samples,
)
from vlmr1_jax.rewards.format import THINK_THEN_ANSWER
from vlmr1_jax.rewards.registry import register_reward

_INT_BOX = re.compile(r"\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]")


def has_rec_format(content: str) -> bool:
    r"""`re.search(r"<think>.*?</think>\s*<answer>.*?\{.*\[\d+,\s*\d+,\s*\d+,\s*\d+\].*\}.*?</answer>", c, DOTALL)`.

    Decided in linear time by taking each part at its earliest position (the regex backtracks for seconds on
    long repetitive completions).
    """
    start = content.find("<think>")
    bridge = THINK_THEN_ANSWER.search(content, start + len("<think>")) if start >= 0 else None
    brace = content.find("{", bridge.end()) if bridge else -1
    box = _INT_BOX.search(content, brace + 1) if brace >= 0 else None
    close = content.find("}", box.end()) if box else -1
    return close >= 0 and content.find("</answer>", close + 1) >= 0


@register_reward("rec_format")
def format_reward_rec(completions: list[str], **columns: Any) -> list[float]:
    """1.0 when the completion contains think-then-answer with `{...[int, int, int, int]...}` in the answer."""
    return [1.0 if has_rec_format(content) else 0.0 for content in completions]


def has_plain_rec_format(content: str) -> bool:
    r"""`re.search(r"<think>.*?</think>\s*<answer>.*?\[\d+,\s*\d+,\s*\d+,\s*\d+\].*?</answer>", c, DOTALL)`.

    In linear time, each part at its earliest position, as `has_rec_format` decides its regex.
    """
    start = content.find("<think>")
    bridge = THINK_THEN_ANSWER.search(content, start + len("<think>")) if start >= 0 else None
    box = _INT_BOX.search(content, bridge.end()) if bridge else None
    return box is not None and content.find("</answer>", box.end()) >= 0


@register_reward("rec_format_plain")
def format_reward_rec_plain(completions: list[str], **columns: Any) -> list[float]:
    """1.0 when the completion contains think-then-answer with `[int, int, int, int]` in the answer (VLM-R1's
    InternVL `format_reward_rec`)."""
    return [1.0 if has_plain_rec_format(content) else 0.0 for content in completions]


@functools.lru_cache(maxsize=4096)
def image_size(path: str) -> tuple[int, int]:
    """(width, height) of the image file, read from its header."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as err:
        raise RewardInputError(f"image_path: cannot read image size of {path!r} ({err})") from None


def _truth_box(solution: str) -> Box:
    answer = last_answer(solution)
    try:
        box = as_box(json.loads(answer)) if answer is not None else None
    except (ValueError, RecursionError):
        box = None
    if box is None:
        raise RewardInputError(f"solution: expected '<answer> [x1, y1, x2, y2] </answer>', got {solution!r}")
    return box


def _model_frame(sizes: Any) -> tuple[int, int] | None:
    """(height, width) in pixels of the frame the model answered in for the first image, or None when the model
    family's boxes are not in resized pixels (nothing to rescale)."""
    nested = isinstance(sizes, (list, tuple)) and bool(sizes) and not isinstance(sizes[0], (int, np.integer))
    first = sizes[0] if nested else sizes  # [[h, w], ...] per image, or a bare [h, w]
    if first is None:
        return None
    try:
        height, width = (int(v) for v in first)
    except (ValueError, TypeError):
        raise RewardInputError(f"model_image_size: expected [[height, width], ...] per sample, got {sizes!r}") from None
    if height <= 0 or width <= 0:
        raise RewardInputError(f"model_image_size: empty frame {sizes!r}")
    return height, width


def _first_path(paths: Any) -> str:
    path = paths if isinstance(paths, str) else (paths[0] if paths else None)
    if not isinstance(path, str):
        raise RewardInputError(f"image_path: expected a list of paths per sample, got {paths!r}")
    return path


def rec_iou_score(content: str, solution: str, frame: tuple[int, int, int, int] | None) -> float:
    """IoU of the first `[int, int, int, int]` in the first answer against the ground-truth box (0.0 if none).

    `frame = (model_h, model_w, image_h, image_w)` maps the box from the resized frame the model saw to the
    original image, as VLM-R1 does since 2025-06-26; None leaves it unscaled.
    """
    truth = _truth_box(solution)
    answer = first_answer(content)
    match = _INT_BOX.search(answer.strip()) if answer is not None else None
    if match is None:
        return 0.0
    try:
        x1, y1, x2, y2 = (int(g) for g in match.groups())
        if frame is not None:
            model_h, model_w, image_h, image_w = frame
            x1, x2 = x1 / model_w * image_w, x2 / model_w * image_w  # type: ignore[assignment]
            y1, y2 = y1 / model_h * image_h, y2 / model_h * image_h  # type: ignore[assignment]
        box = (float(x1), float(y1), float(x2), float(y2))
    except (ValueError, OverflowError):  # digits beyond int()'s limit or a float's range
        return 0.0
    return iou(box, truth)


@register_reward("rec_iou")
def iou_reward(
    completions: list[str],
    *,
    solution: list[str] | None = None,
    model_image_size: list | None = None,
    image_path: list | None = None,
    rescale: bool = True,
    **columns: Any,
) -> list[float]:
    """VLM-R1 Qwen `iou_reward`: continuous IoU in [0, 1] with the +-1 convention, no threshold.

    With `rescale` (default) the box is mapped from the frame the model saw (`model_image_size[i][0]`, [height,
    width] from the family's processor: Qwen2.5-VL's is grid_thw * 14) to the original size read from
    `image_path[i][0]`; `rescale=False` (or a None frame) is VLM-R1 before 2025-06-26, and InternVL.
    """
    n = len(completions)
    solutions = aligned(solution, "solution", n, required=True)
    frames = aligned(model_image_size, "model_image_size", n, required=rescale)
    paths = aligned(image_path, "image_path", n, required=rescale)

    def score(i: int) -> float:
        model_frame = _model_frame(frames[i]) if rescale else None
        frame = None
        if model_frame is not None:
            image_w, image_h = image_size(_first_path(paths[i]))
            frame = (*model_frame, image_h, image_w)
        return rec_iou_score(completions[i], solutions[i], frame)

    return score_samples(score, n, aligned(columns.get("id"), "id", n))
