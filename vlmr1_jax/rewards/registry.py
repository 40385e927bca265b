"""Reward registry: names -> `fn(completions: list[str], **columns) -> list[float]`, plus user functions by path.

Columns are dataset columns as lists aligned with `completions` (solution, accu_reward_method, image_path,
image_grid_thw, problem, id, ...). Options (e.g. `vlmr1_compat`, `tokenizer`) are bound once with `get_reward`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from vlmr1_jax.user_code import import_function

RewardFn = Callable[..., list[float]]

REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available as `get_reward(name)`; a name can be registered once."""

    def decorate(fn: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered (to {REWARDS[name].__qualname__})")
        REWARDS[name] = fn
        return fn

    return decorate


def get_reward(name: str, **options: Any) -> RewardFn:
    """The reward registered as `name`, or `package.module:function` imported; `options` bound as keywords.

    Each option must be a named parameter of the function (a typo is an error, not silently ignored). The bound
    function keeps the original `__name__`, which is what training logs as `rewards/<__name__>`.
    """
    if ":" in name:
        fn = import_function(name, "reward")
    elif name in REWARDS:
        fn = REWARDS[name]
    else:
        raise ValueError(
            f"unknown reward {name!r}; registered: {', '.join(sorted(REWARDS))}, "
            f"or a user function as 'package.module:function'"
        )
    if not options:
        return fn
    parameters = inspect.signature(fn).parameters
    unknown = sorted(
        set(options) - {p.name for p in parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    )
    if unknown:
        raise ValueError(f"reward {name!r} has no option(s) {', '.join(unknown)}")

    @functools.wraps(fn)
    def bound(completions: list[str], **columns: Any) -> list[float]:
        return fn(completions, **options, **columns)

    return bound
