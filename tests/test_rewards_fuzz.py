"""Robustness: random and adversarial completions (broken JSON, huge numbers, negative boxes, nested tags, unicode,
empty) never raise and stay in each reward's range; arbitrary ground truths score in range or raise RewardInputError.

Two layers. Hypothesis properties per reward (a few hundred examples each: generating one example costs ~4 ms here,
far more than most rewards). Seeded sweeps of 10,000 adversarial strings per reward, built from the same
fragments with `random`, including the COCO (pycocotools) and math_verify accuracy methods."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vlmr1_jax.rewards import get_reward
from vlmr1_jax.rewards.common import RewardInputError

BOX_JSON = [
    '{"bbox_2d": [0, 0, 100, 100], "label": "cat"}',
    '{"bbox_2d": [-50, -5, -1, 10], "label": "cat"}',
    '{"bbox_2d": [1e400, 0, 5, 5], "label": "cat"}',
    '{"bbox_2d": [10, 10, 0, 0], "label": "dog"}',
    '{"bbox_2d": [0, 0, 100], "label": "cat"}',
    '{"bbox_2d": "x", "label": ["cat"]}',
    '{"label": "cat"}',
    '{"bbox_2d": [0, 0, 100, 100]}',
    '{"bbox_2d": [1.5, 2.5, 60, 70.25], "label": "CAT"}',
    '{"bbox_2d": [' + "9" * 400 + ', 0, 1, 1], "label": "cat"}',
]
FRAGMENTS = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<answer><answer>",
    "</answer></answer>",
    "```json",
    "```",
    "\n",
    " ",
    "\r\n",
    "[",
    "]",
    "{",
    "}",
    ",",
    ":",
    '"bbox_2d"',
    '"label"',
    "[1, 2, 3, 4]",
    "[-5, -5, 10, 10]",
    "[0, 0, 0, 0]",
    "[99999999999999999999, 0, 1, 1]",
    "9" * 5000,
    "1e400",
    "NaN",
    "-Infinity",
    "null",
    "None",
    "none",
    "yes",
    "no",
    "A.",
    "B,",
    "C",
    "\\boxed{",
    "\\boxed ",
    "\\frac",
    "\\sqrt",
    "\\text{ ",
    "\\fbox{",
    "$",
    "1/2",
    "0.5",
    "=",
    "答案",
    "选择",
    "。",
    "é",
    "\u200b",
    "\U0001f642",
    "\x00",
    "[{",
    "}]",
    *BOX_JSON,
    "[" + ", ".join(BOX_JSON[:3]) + "]",
    "[" + BOX_JSON[0] + ", " + BOX_JSON[0] + "]",
]


def adversarial(max_pieces: int = 12) -> st.SearchStrategy[str]:
    piece = st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6))
    return st.lists(piece, max_size=max_pieces).map("".join)


def fenced(boxes: list[str]) -> str:
    return "```json\n[" + ", ".join(boxes) + "]\n```"


TRUTH_BLOCKS = [
    fenced([]),
    fenced(['{"bbox_2d": [0, 0, 100, 100], "label": "cat"}']),
    fenced(
        [
            '{"bbox_2d": [0, 0, 100, 100], "label": "cat"}',
            '{"bbox_2d": [5, 5, 50, 60], "label": "dog"}',
            '{"bbox_2d": [3, 3, 1, 1], "label": "cat"}',
        ]
    ),
    "None",
]
TRUTHS = {
    "mcq": ["B", "C. a dog", "no letter"],
    "yes_no": ["yes", "No"],
    "llm": ["Paris", ""],
    "all_match": ["Operation No Response", ""],
    "weighted_sum": TRUTH_BLOCKS,
    "map": TRUTH_BLOCKS,
    "od_ap": TRUTH_BLOCKS,
    "od_ap50": TRUTH_BLOCKS,
    "odLength": TRUTH_BLOCKS,
    "math": ["\\frac{1}{2}", "42", "x^2"],
    "default": ["42", "B", "a red car", "3.5 cm"],
}
FAST = ["mcq", "yes_no", "llm", "all_match", "weighted_sum"]
COCO = ["map", "od_ap", "od_ap50", "odLength"]
MATH = ["math", "default"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _in_range(values, low, high):
    return all(isinstance(v, float) and low <= v <= high for v in values)


def _accuracy_case(method_names):
    return st.sampled_from(method_names).flatmap(
        lambda m: st.tuples(st.just(m), adversarial(), st.sampled_from(TRUTHS[m]))
    )


@given(adversarial())
@settings(max_examples=600, **SETTINGS)
def test_format_rewards(content):
    for name in ("format", "rec_format"):
        assert get_reward(name)([content]) in ([0.0], [1.0])


@given(adversarial())
@settings(max_examples=600, **SETTINGS)
def test_repetition(content):
    assert _in_range(get_reward("repetition")([content]), -1.0, 0.0)


@given(adversarial(), st.sampled_from(TRUTH_BLOCKS))
@settings(max_examples=600, **SETTINGS)
def test_length(content, truth):
    got = get_reward("length", count="bytes")([content], solution=[f"<answer> {truth} </answer>"])
    assert _in_range(got, -0.5, 1.0)


def _odd_judge(student: str, truth: str) -> float:
    return len(student) - len(truth)  # out-of-range verdicts must be clipped


@given(_accuracy_case(FAST))
@settings(max_examples=1_000, **SETTINGS)
def test_accuracy_cheap_methods(case):
    method, content, truth = case
    got = get_reward("accuracy", llm_judge=_odd_judge)(
        [content], solution=[f"<answer> {truth} </answer>"], accu_reward_method=[method]
    )
    assert _in_range(got, 0.0, 1.0)


@given(_accuracy_case(COCO))
@settings(max_examples=300, **SETTINGS)
def test_accuracy_coco_methods(case):
    method, content, truth = case
    for completion in (content, f"<answer>```json\n{content}\n```</answer>"):
        got = get_reward("accuracy")(
            [completion], solution=[f"<answer> {truth} </answer>"], accu_reward_method=[method]
        )
        assert _in_range(got, 0.0, 1.0)


@given(_accuracy_case(MATH))
@settings(max_examples=150, **SETTINGS)
def test_accuracy_math_methods(case):
    method, content, truth = case
    got = get_reward("accuracy")([content], solution=[f"<answer> {truth} </answer>"], accu_reward_method=[method])
    assert _in_range(got, 0.0, 1.0)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("fuzz") / "img.png"
    Image.new("RGB", (333, 517)).save(path)
    return str(path)


@given(adversarial(), st.lists(st.floats(-1e6, 1e6), min_size=4, max_size=4))
@settings(max_examples=600, **SETTINGS)
def test_rec_iou(image_path, content, truth):
    got = get_reward("rec_iou")(
        [content],
        solution=[f"<answer> {json.dumps(truth)} </answer>"],
        model_image_size=[[[504, 336]]],
        image_path=[[image_path]],
    )
    assert _in_range(got, 0.0, 1.0)


@given(st.sampled_from(FAST + COCO), adversarial(), adversarial())
@settings(max_examples=600, **SETTINGS)
def test_arbitrary_truth_scores_in_range_or_raises_input_error(method, content, truth):
    try:
        got = get_reward("accuracy")([content], solution=[truth], accu_reward_method=[method])
    except RewardInputError:
        return
    assert _in_range(got, 0.0, 1.0)


def random_adversarial(rng: random.Random) -> str:
    """Up to 12 pieces: fragments, random code points (any plane), or short random ASCII."""
    pieces = []
    for _ in range(rng.randint(0, 12)):
        kind = rng.random()
        if kind < 0.7:
            pieces.append(rng.choice(FRAGMENTS))
        elif kind < 0.85:
            code_point = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])
            pieces.append(chr(code_point))
        else:
            pieces.append("".join(chr(rng.randint(32, 126)) for _ in range(rng.randint(1, 5))))
    return "".join(pieces)


def random_box_list(rng: random.Random) -> str:
    """A JSON box list near the truth boxes, mixed with malformed entries, sometimes cut short."""
    entries = []
    for _ in range(rng.randint(0, 5)):
        if rng.random() < 0.75:
            x, y = rng.uniform(-10, 60), rng.uniform(-10, 60)
            box = [round(x), round(y), round(x + rng.uniform(-5, 110)), round(y + rng.uniform(-5, 110))]
            entries.append(json.dumps({"bbox_2d": box, "label": rng.choice(["cat", "dog", "bird", "Cat"])}))
        else:
            entries.append(rng.choice(BOX_JSON))
    text = "[" + ", ".join(entries) + "]"
    return text[: rng.randint(0, len(text))] if rng.random() < 0.2 else text


def _sweep(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        content = random_adversarial(rng) if rng.random() < 0.6 else random_box_list(rng)
        yield rng, rng.choice([content, f"<answer>{content}</answer>", f"<answer>```json\n{content}\n```</answer>"])


def test_sweep_cheap_rewards(image_path):
    rewards = {name: get_reward(name) for name in ("format", "rec_format", "repetition", "rec_iou")}
    rewards["length"] = get_reward("length", count="bytes")
    accuracy = get_reward("accuracy", llm_judge=_odd_judge)
    for rng, content in _sweep(10_000, seed=0):
        truth_block = f"<answer> {rng.choice(TRUTH_BLOCKS)} </answer>"
        assert rewards["format"]([content]) in ([0.0], [1.0]), content
        assert rewards["rec_format"]([content]) in ([0.0], [1.0]), content
        assert _in_range(rewards["repetition"]([content]), -1.0, 0.0), content
        assert _in_range(rewards["length"]([content], solution=[truth_block]), -0.5, 1.0), content
        assert _in_range(
            rewards["rec_iou"](
                [content],
                solution=["<answer> [1, 2, 300, 400] </answer>"],
                model_image_size=[[[504, 336]]],
                image_path=[[image_path]],
            ),
            0.0,
            1.0,
        )
        solutions = [f"<answer> {rng.choice(TRUTHS[m])} </answer>" for m in FAST]
        scores = accuracy([content] * len(FAST), solution=solutions, accu_reward_method=FAST)
        assert _in_range(scores, 0.0, 1.0), content


def test_sweep_coco_methods():
    accuracy = get_reward("accuracy")
    partial = 0
    for rng, content in _sweep(10_000, seed=1):
        solutions = [f"<answer> {rng.choice(TRUTH_BLOCKS[1:3])} </answer>" for _ in COCO]
        scores = accuracy([content] * len(COCO), solution=solutions, accu_reward_method=COCO)
        assert _in_range(scores, 0.0, 1.0), content
        partial += any(0.0 < v < 1.0 for v in scores)
    assert partial > 10  # the sweep does reach pycocotools with partial matches


def test_sweep_math_methods():
    accuracy = get_reward("accuracy")
    for rng, content in _sweep(10_000, seed=2):
        solutions = [f"<answer> {rng.choice(TRUTHS[m])} </answer>" for m in MATH]
        scores = accuracy([content] * len(MATH), solution=solutions, accu_reward_method=MATH)
        assert _in_range(scores, 0.0, 1.0), content
