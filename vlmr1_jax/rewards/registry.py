"""Reward registry: names -> `fn(completions: list[str], **columns) -> list[float]`, plus user functions by path.

Columns are lists aligned with `completions`: every jsonl field of the sample, the derived `problem`, `solution`,
`image_path`, `image_grid_thw` and `prompts` (docs/rewards.md). Options (`rescale`, `count`, ...) are keyword
parameters bound once by `get_reward`; `reward_functions` builds a run's rewards from `grpo.reward_funcs` /
`grpo.reward_options` and is the one place that names their metrics, `rewards/<function __name__>` as VLM-R1 does.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

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


def _resolve(name: str) -> RewardFn:
    """The reward registered as `name`, or `package.module:function` imported."""
    if ":" in name:
        return import_function(name, "reward")
    if name in REWARDS:
        return REWARDS[name]
    raise ValueError(
        f"unknown reward {name!r}; registered: {', '.join(sorted(REWARDS))}, "
        f"or a user function as 'package.module:function'"
    )


def _keywords(fn: RewardFn) -> list[str]:
    """The parameters of `fn` that can be passed by keyword."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` fits the annotation `hint`; annotations other than Literal, unions, None, bool, int, float
    and str (callables, objects) are not checked."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool or hint is str:
        return isinstance(value, hint)
    if hint is int or hint is float:
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return True


def _check_options(name: str, fn: RewardFn, options: Mapping[str, Any]) -> None:
    """Refuse an option that is not a keyword parameter of `fn`, or whose value does not fit its annotation (a
    recipe's `rescale: flase` would otherwise be a truthy string)."""
    known = [p for p in _keywords(fn) if p != "completions"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"reward {name!r} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(known) or 'none'}"
        )
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # an annotation that does not resolve: nothing to check against
        hints = {}
    for option, value in options.items():
        if option in hints and not _fits(value, hints[option]):
            raise ValueError(
                f"reward {name!r} option {option}={value!r}: expected {inspect.formatannotation(hints[option])}"
            )


def _bind(fn: RewardFn, options: Mapping[str, Any]) -> RewardFn:
    """`fn` with `options` bound as keywords; it keeps `fn.__name__` (the metric name)."""
    if not options:
        return fn

    @functools.wraps(fn)
    def bound(completions: list[str], **columns: Any) -> list[float]:
        clash = sorted(set(options) & set(columns))
        if clash:
            raise ValueError(
                f"reward {fn.__name__!r}: option(s) {', '.join(clash)} are also data columns; rename the "
                f"function's parameter or the jsonl field"
            )
        return fn(completions, **options, **columns)

    return bound


def get_reward(name: str, **options: Any) -> RewardFn:
    """The reward registered as `name`, or `package.module:function` imported; `options` bound as keywords.

    Each option must be a keyword parameter of the function whose annotation its value fits (a typo is an error,
    not silently ignored). The bound function keeps the original `__name__`, which training logs as
    `rewards/<__name__>`.
    """
    fn = _resolve(name)
    _check_options(name, fn, options)
    return _bind(fn, options)


def reward_functions(
    names: Sequence[str],
    options: Mapping[str, Any],
    tokenizer: Any = None,
    variants: Mapping[str, str] | None = None,
) -> dict[str, RewardFn]:
    """A run's rewards (`grpo.reward_funcs`) as {metric name: function}, each with its `grpo.reward_options`
    bound, and `tokenizer` bound to every reward that declares a `tokenizer` parameter (rewards that count tokens).

    `variants` (the model family's processor's `reward_variants`, VLM-R1's `select_reward_func`) replaces a listed
    name by the family's own reward (InternVL: `rec_format` -> `rec_format_plain`); its options keep the listed name.

    The metric name is the function's `__name__`, as VLM-R1 logs it (`rewards/iou_reward` for `rec_iou`); two
    rewards with one name, or options for a reward that is not in `names`, are errors. Without `tokenizer` this
    only checks the recipe (every name resolves, every option fits), which `vlmr1 train` does before loading.
    """
    stray = sorted(set(options) - set(names))
    if stray:
        raise ValueError(
            f"grpo.reward_options has options for {', '.join(map(repr, stray))}, which grpo.reward_funcs "
            f"{list(names)} does not list; the keys are reward names exactly as grpo.reward_funcs spells them"
        )
    out: dict[str, RewardFn] = {}
    first: dict[str, str] = {}
    for name in names:
        given = options.get(name) or {}
        if not isinstance(given, Mapping) or not all(isinstance(k, str) for k in given):
            raise ValueError(f"grpo.reward_options.{name}: expected a mapping of option -> value, got {given!r}")
        if "tokenizer" in given:
            raise ValueError(
                f"grpo.reward_options.{name}.tokenizer: the trainer passes the run's tokenizer to a reward with a "
                f"'tokenizer' parameter; remove the option"
            )
        try:
            fn = _resolve((variants or {}).get(name, name))
        except ValueError as err:
            raise ValueError(f"grpo.reward_funcs: {err}") from None
        bound = dict(given)
        if tokenizer is not None and "tokenizer" in _keywords(fn):
            bound["tokenizer"] = tokenizer
        try:
            _check_options(name, fn, bound)
        except ValueError as err:
            raise ValueError(f"grpo.reward_options.{name}: {err}") from None
        metric = getattr(fn, "__name__", name)
        if metric in out:
            raise ValueError(
                f"grpo.reward_funcs: {first[metric]!r} and {name!r} both log as rewards/{metric} (a reward's metric "
                f"is its function's name, as in VLM-R1); list a reward once, and give user functions distinct names"
            )
        out[metric], first[metric] = _bind(fn, bound), name
    return out
