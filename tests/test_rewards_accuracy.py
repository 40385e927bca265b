"""`accuracy`: dispatch over all 11 methods, default / math / llm semantics, hand tables."""

from __future__ import annotations

import io
import json

import pytest

from vlmr1_jax.rewards import get_reward
from vlmr1_jax.rewards.accuracy import accuracy_reward, all_match_score, default_accuracy_score
from vlmr1_jax.rewards.common import RewardInputError
from vlmr1_jax.rewards.llm_judge import http_judge, judge_from_env, llm_score
from vlmr1_jax.rewards.math_answer import compute_score, is_equiv, last_boxed, remove_boxed, strip_string


def lcs_ratio(a: str, b: str) -> float:
    """Levenshtein `ratio` = 1 - indel distance / (|a|+|b|) = 2 LCS / (|a|+|b|), from the LCS table."""
    if not a and not b:
        return 1.0
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return 2 * table[-1][-1] / (len(a) + len(b))


def _answer(text: str) -> str:
    return f"<answer> {text} </answer>"


def _block(boxes) -> str:
    return "```json\n" + json.dumps(boxes) + "\n```"


CAT = {"bbox_2d": [0, 0, 100, 100], "label": "cat"}
DOG = {"bbox_2d": [20, 20, 30, 30], "label": "dog"}

# (method, completion, solution, expected), each hand-derived from VLM-R1's code
DISPATCH_TABLE = [
    ("mcq", "<think>x</think><answer>B.</answer>", _answer("B"), 1.0),
    ("yes_no", "<answer>No way</answer>", _answer("yes"), 0.0),
    ("llm", "<answer>Paris</answer>", _answer("Paris"), 1.0),  # no judge: exact match
    ("map", "<answer>" + _block([CAT]) + "</answer>", _answer(_block([CAT])), 1.0),
    ("math", "<answer>\\frac{1}{2}</answer>", _answer("0.5"), 1.0),
    ("weighted_sum", "<answer>" + _block([CAT]) + "</answer>", _answer(_block([CAT, DOG])), 0.7 * 0.5 + 0.3 * 0.75),
    ("od_ap", "no tags", _answer("None"), 0.0),
    (
        "od_ap50",
        "<answer>" + _block([{"bbox_2d": [0, 0, 100, 64], "label": "cat"}]) + "</answer>",
        _answer(_block([CAT])),
        1.0,
    ),  # IoU 0.64 >= 0.5
    ("odLength", "<answer>" + _block([CAT, CAT]) + "</answer>", _answer(_block([CAT])), 0.5),
    ("all_match", "<answer>Operation No Response.</answer>", _answer("operation no response"), 1.0),
    ("default", "<answer>41</answer>", _answer("42"), 0.0),
    ("no_such_method", "<answer>42</answer>", _answer("42"), 1.0),  # unknown: default, as VLM-R1
]


def test_dispatch_covers_all_methods_in_one_batch(monkeypatch):
    monkeypatch.delenv("VLMR1_LLM_JUDGE_URL", raising=False)
    methods, completions, solutions, expected = map(list, zip(*DISPATCH_TABLE))
    got = get_reward("accuracy")(completions, solution=solutions, accu_reward_method=methods, id=list(range(12)))
    assert got == pytest.approx(expected)
    assert accuracy_reward.__name__ == "accuracy_reward"


def test_missing_method_column_means_default():
    assert accuracy_reward(["<answer>42</answer>"], solution=[_answer("42")]) == [1.0]


def test_missing_solution_and_misaligned_columns_are_clear_errors():
    with pytest.raises(RewardInputError, match="'solution'"):
        accuracy_reward(["x"])
    with pytest.raises(RewardInputError, match="accu_reward_method"):
        accuracy_reward(["x", "y"], solution=["a", "b"], accu_reward_method=["mcq"])


def test_malformed_truth_error_names_the_sample_and_id():
    with pytest.raises(RewardInputError, match=r"sample 1 \(id='b'\): solution"):
        accuracy_reward(
            ["<answer>x</answer>"] * 2,
            solution=[_answer("None"), _answer("```json [oops ```")],
            accu_reward_method=["od_ap", "od_ap"],
            id=["a", "b"],
        )


@pytest.mark.parametrize(
    "content, solution, expected",
    [
        ("<answer>42</answer>", _answer("42"), 1.0),
        ("<answer>\\frac{1}{2}</answer>", _answer("0.5"), 1.0),  # math_verify
        ("<answer>10.0</answer>", _answer("10"), 1.0),
        ("<answer>41</answer>", _answer("42"), 0.0),  # numbers: exact float equality
        ("<answer>ten</answer>", _answer("10 apples"), lcs_ratio("ten", "10 apples")),  # not a float: ratio
        ("<answer>C.</answer>", _answer("B."), 0.0),  # choice letters
        ("<answer>The cat</answer>", _answer("the cats"), lcs_ratio("the cat", "the cats")),
        ("a<answer>x</answer><answer>The cat</answer>", _answer("the cats"), lcs_ratio("the cat", "the cats")),
        ("The cat", "the cats", lcs_ratio("the cat", "the cats")),  # untagged on both sides
    ],
)
def test_default_accuracy(content, solution, expected):
    assert default_accuracy_score(content, solution) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\frac12", "\\frac{1}{2}"),
        ("\\frac1{2}", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}"),
        (".5", "\\frac{1}{2}"),
        ("3/4", "\\frac{3}{4}"),
        ("x = 5", "5"),
        ("5\\text{ cm}", "5"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("90^\\circ", "90"),
        ("\\left(1, 2\\right)", "(1,2)"),
        ("50\\%", "50"),
        ("", ""),
    ],
)
def test_strip_string(text, expected):
    assert strip_string(text) == expected


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ("\\frac12", "0.5", True),
        ("a/b", "a/b", True),  # int('a') fails: raw comparison
        ("\\sqrt", "\\sqrt", True),  # bare \sqrt cannot be normalised: raw comparison
        ("\\sqrt", "\\sqrt{}", False),
        ("1\\text{ a}\\text{ b}", "1", False),  # two unit groups: raw comparison
    ],
)
def test_is_equiv(a, b, expected):
    assert is_equiv(a, b) is expected


@pytest.mark.parametrize(
    "text, boxed, inner",
    [
        ("so \\boxed{\\frac{1}{2}} done", "\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2}", "\\boxed{2}", "2"),
        ("\\boxed 5$ and", "\\boxed 5", "5"),
        ("\\fbox{3}", "\\fbox{3}", None),
        ("\\boxed{unclosed", None, None),
        ("nothing", None, None),
    ],
)
def test_boxed(text, boxed, inner):
    assert last_boxed(text) == boxed
    if boxed is not None:
        assert remove_boxed(boxed) == inner


@pytest.mark.parametrize(
    "answer, truth, expected",
    [
        ("abc", "abc", 1.0),
        ("foo", "bar", 0.0),
        ("the answer is \\boxed{\\frac12}", "\\frac{1}{2}", 1.0),
    ],
)
def test_compute_score(answer, truth, expected):
    assert compute_score(answer, truth) == expected


def test_all_match():
    assert (
        all_match_score("<think>x</think><answer>Unexpected Task Result.</answer>", _answer("Unexpected Task Result"))
        == 1.0
    )
    assert all_match_score("<answer>Unexpected</answer>", _answer("Unexpected Task Result")) == 0.0


def test_llm_judge_injected_and_fallbacks(monkeypatch):
    monkeypatch.delenv("VLMR1_LLM_JUDGE_URL", raising=False)
    seen = []

    def judge(student, truth):
        seen.append((student, truth))
        return 1.0

    assert llm_score("<answer>a</answer><answer> Paris, France </answer>", _answer("Paris"), judge) == 1.0
    assert seen == [("Paris, France", "Paris")]  # last student answer, first truth answer, stripped
    assert llm_score("<answer>x</answer>", _answer("x"), lambda s, t: 7) == 1.0  # clipped
    assert llm_score("<answer>x</answer>", _answer("y"), lambda s, t: "0.0") == 0.0

    def broken(student, truth):
        raise ConnectionError("down")

    assert llm_score("<answer>x</answer>", _answer("x"), broken) == 1.0  # exact-match fallback
    assert llm_score("<answer>x</answer>", _answer("y"), lambda s, t: float("nan")) == 0.0
    assert judge_from_env() is None
    assert accuracy_reward(
        ["<answer>x</answer>"], solution=[_answer("y")], accu_reward_method=["llm"], llm_judge=lambda s, t: 1.0
    ) == [1.0]


def test_http_judge_request_without_network(monkeypatch):
    captured = {}

    def fake_urlopen(request, timeout):
        captured.update(url=request.full_url, body=json.loads(request.data), auth=request.get_header("Authorization"))
        return io.BytesIO(json.dumps({"choices": [{"message": {"content": " 1.0\n"}}]}).encode())

    monkeypatch.setattr("urllib.request.urlopen", fake_urlopen)
    monkeypatch.setenv("VLMR1_LLM_JUDGE_URL", "http://judge.invalid/v1/")
    monkeypatch.setenv("VLMR1_LLM_JUDGE_API_KEY", "k")
    judge = judge_from_env()
    assert judge("Paris", "paris") == 1.0
    assert captured["url"] == "http://judge.invalid/v1/chat/completions"
    assert captured["body"]["model"] == "qwen2.5:7b" and captured["body"]["temperature"] == 0
    assert "Paris" in captured["body"]["messages"][-1]["content"]
    assert captured["auth"] == "Bearer k"
    assert http_judge("http://x/v1", model="m")  # builds without touching the network
