"""Referring-expression rewards of VLM-R1's Qwen module: `rec_iou` (`iou_reward`) and `rec_format`."""

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
PATCH_SIZE = 14  # image_grid_thw counts 14-px patches (before the 2x2 merge)


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


def _model_frame(grid: Any) -> tuple[int, int]:
    """(height, width) in pixels of the first image as the model saw it, from its [t, h, w] patch grid."""
    try:
        _, grid_h, grid_w = np.asarray(grid, dtype=np.int64).reshape(-1, 3)[0]
    except (ValueError, TypeError, IndexError):
        raise RewardInputError(f"image_grid_thw: expected [[t, h, w], ...] per sample, got {grid!r}") from None
    if grid_h <= 0 or grid_w <= 0:
        raise RewardInputError(f"image_grid_thw: empty grid {grid!r}")
    return int(grid_h * PATCH_SIZE), int(grid_w * PATCH_SIZE)


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
    image_grid_thw: list | None = None,
    image_path: list | None = None,
    rescale: bool = True,
    **columns: Any,
) -> list[float]:
    """VLM-R1 Qwen `iou_reward`: continuous IoU in [0, 1] with the +-1 convention, no threshold.

    With `rescale` (default) the box is mapped from the model's frame (`image_grid_thw[i][0]` * 14) to the
    original size read from `image_path[i][0]`; `rescale=False` is VLM-R1 before 2025-06-26 (and InternVL).
    """
    n = len(completions)
    solutions = aligned(solution, "solution", n, required=True)
    grids = aligned(image_grid_thw, "image_grid_thw", n, required=rescale)
    paths = aligned(image_path, "image_path", n, required=rescale)

    def score(i: int) -> float:
        frame = None
        if rescale:
            image_w, image_h = image_size(_first_path(paths[i]))
            frame = (*_model_frame(grids[i]), image_h, image_w)
        return rec_iou_score(completions[i], solutions[i], frame)

    return score_samples(score, n, aligned(columns.get("id"), "id", n))
