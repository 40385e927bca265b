"""Reward registry (names, user functions by path, bound options) and the `vlmr1 reward` sub-command."""

from __future__ import annotations

import argparse

import pytest

from vlmr1_jax.cli.rewards import register
from vlmr1_jax.rewards import REWARDS, get_reward, register_reward

BUILTIN = {
    "accuracy": "accuracy_reward",
    "format": "format_reward",
    "length": "cosine_rewards",
    "repetition": "repetition_rewards",
    "rec_iou": "iou_reward",
    "rec_format": "format_reward_rec",
}


def test_builtin_names_and_log_names():
    assert {name: get_reward(name).__name__ for name in BUILTIN} == BUILTIN


def user_reward(completions, *, bonus=0.0, **columns):
    return [len(c) + bonus for c in completions]


NOT_CALLABLE = 3


def test_user_function_by_dotted_path():
    fn = get_reward(f"{__name__}:user_reward")
    assert fn(["ab", "c"]) == [2, 1]
    bound = get_reward(f"{__name__}:user_reward", bonus=0.5)
    assert bound(["ab"]) == [2.5] and bound.__name__ == "user_reward"


@pytest.mark.parametrize(
    "name, message",
    [
        ("no_such_module_xyz:fn", "cannot import module"),
        (f"{__name__}:missing", "has no attribute 'missing'"),
        (f"{__name__}:NOT_CALLABLE", "not a function"),
        (":fn", "package.module:function"),
        ("nonexistent", "unknown reward"),
    ],
)
def test_lookup_errors(name, message):
    with pytest.raises(ValueError, match=message):
        get_reward(name)


def test_unknown_option_is_an_error_and_options_keep_the_name():
    with pytest.raises(ValueError, match="vlmr1_compt"):
        get_reward("length", vlmr1_compt=True)
    fn = get_reward("length", vlmr1_compat=True, length_fn=len)
    assert fn.__name__ == "cosine_rewards" and fn([""]) == [1.0]


def test_register_reward_decorator():
    @register_reward("test_constant")
    def constant_reward(completions, **columns):
        return [0.5] * len(completions)

    try:
        assert get_reward("test_constant")(["a", "b"]) == [0.5, 0.5]
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_constant")(user_reward)
    finally:
        del REWARDS["test_constant"]


def _cli(argv):
    parser = argparse.ArgumentParser(prog="vlmr1")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["reward", *argv])
    return args.func(args)


@pytest.mark.parametrize(
    "argv, printed",
    [
        (["format", "--completion", "<think>a</think><answer>b</answer>"], "1.0"),
        (
            [
                "accuracy",
                "--completion",
                "<answer>B.</answer>",
                "--solution",
                "<answer> B </answer>",
                "--column",
                "accu_reward_method=mcq",
            ],
            "1.0",
        ),  # a plain string where JSON does not parse
        (
            [
                "accuracy",
                "--completion",
                "<answer>x</answer>",
                "--solution",
                "<answer> x </answer>",
                "--column",
                'accu_reward_method="all_match"',
            ],
            "1.0",
        ),
        (
            [
                "rec_iou",
                "--completion",
                "<answer>[0, 0, 10, 10]</answer>",
                "--solution",
                "<answer> [0, 0, 10, 5] </answer>",
                "--option",
                "rescale=false",
            ],
            "0.5",
        ),
        (["length", "--completion", "", "--option", "vlmr1_compat=true", "--option", "count=bytes"], "1.0"),
    ],
)
def test_cli_prints_the_score(capsys, argv, printed):
    assert _cli(argv) == 0
    assert capsys.readouterr().out.strip() == printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nope", "--completion", "x"], "unknown reward"),
        (["accuracy", "--completion", "x"], "'solution'"),
        (["format", "--completion", "x", "--column", "novalue"], "KEY=VALUE"),
        (
            [
                "accuracy",
                "--completion",
                "x",
                "--solution",
                "<answer> ```json [ ``` </answer>",
                "--column",
                "accu_reward_method=map",
            ],
            "not valid JSON",
        ),
    ],
)
def test_cli_errors_exit_2(capsys, argv, message):
    assert _cli(argv) == 2
    assert message in capsys.readouterr().err
