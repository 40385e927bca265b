"""Text helpers and format rewards against VLM-R1's regexes: hand tables, and the linear-time tag scans, format
checks and choice scoring against the regexes and loop VLM-R1 uses (run on short strings, where those are fast)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings, strategies as st

from vlmr1_jax.rewards.choice import extract_choice, mcq_score, yes_no_score
from vlmr1_jax.rewards.common import clean_text, first_answer, first_between, iou, last_answer
from vlmr1_jax.rewards.detection import json_block
from vlmr1_jax.rewards.format import format_reward, has_think_answer_format
from vlmr1_jax.rewards.length import find_box_array
from vlmr1_jax.rewards.rec import format_reward_rec, has_rec_format

# The regexes as VLM-R1's code writes them: the references the linear-time checks must agree with.
FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
REC_FORMAT_RE = re.compile(
    r"<think>.*?</think>\s*<answer>.*?\{.*\[\d+,\s*\d+,\s*\d+,\s*\d+\].*\}.*?</answer>", re.DOTALL
)
BOX_ARRAY_RE = re.compile(r'\[\s*{.*?"bbox_2d".*?"label".*?}\s*\]', re.DOTALL)

PIECES = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    " ",
    "\n",
    "{",
    "}",
    "[",
    "]",
    "[1, 2,3,4]",
    "[1,2,3]",
    "[12,3, 4,5]",
    "x",
    '"bbox_2d"',
    '"label"',
    ",",
    "9",
    "</think> <answer>",
]
snippets = st.lists(st.sampled_from(PIECES), max_size=14).map("".join)
MATCHING = [
    "<think>a</think>\n<answer>b</answer>",
    '<think>a</think> <answer>{"b": [1, 2,3,4]}</answer>',
    'x [{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6, 7, 8], "label": "b"}] y',
]


@st.composite
def near_matches(draw) -> str:
    """A string one of the regexes matches, then up to 2 random splices."""
    text = draw(st.sampled_from(MATCHING))
    for _ in range(draw(st.integers(0, 2))):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 12)))
        text = text[:start] + draw(st.sampled_from(PIECES + [""])) + text[end:]
    return text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer> Cat. </answer>", "cat"),
        ("a<answer>x</answer>b<answer> Last\nLine. </answer>", "last line"),  # last answer; bare newline -> space
        ("one \ntwo", "one two"),  # newline after whitespace is dropped
        ("a\n\nb", "a b"),  # the second newline follows whitespace: dropped
        ("a\r\nb", "a b"),
        ("  Done...  ", "done"),
        ("<answer>unclosed", "<answer>unclosed"),
        ("", ""),
    ],
)
def test_clean_text(text, expected):
    assert clean_text(text) == expected


def _continuous_iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [5, 5, 15, 15], 25 / 175),
        ([0, 0, 10, 10], [9, 0, 20, 10], 0.0),  # overlap width 1: zero under the +-1 convention
        ([0, 0, 10, 10], [8, 0, 20, 10], 20 / 200),  # overlap width 2 counts as continuous IoU
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),
        ([5, 5, 5, 5], [5, 5, 5, 5], 0.0),  # zero union: VLM-R1 divides by zero, its callers score 0
        ([10, 10, 0, 0], [0, 0, 10, 10], 0.0),  # inverted box
    ],
)
def test_iou_table(a, b, expected):
    assert iou(a, b) == pytest.approx(expected, abs=1e-12)


@given(st.lists(st.floats(0, 100), min_size=8, max_size=8))
@settings(max_examples=1000, deadline=None)
def test_iou_equals_continuous_iou_for_overlaps_wider_than_one(v):
    a = [min(v[0], v[2]), min(v[1], v[3]), max(v[0], v[2]), max(v[1], v[3])]
    b = [min(v[4], v[6]), min(v[5], v[7]), max(v[4], v[6]), max(v[5], v[7])]
    overlap_w = min(a[2], b[2]) - max(a[0], b[0])
    overlap_h = min(a[3], b[3]) - max(a[1], b[1])
    if overlap_w > 1 + 1e-9 and overlap_h > 1 + 1e-9:
        assert iou(a, b) == pytest.approx(_continuous_iou(a, b), rel=1e-9, abs=1e-12)
    elif overlap_w < 1 - 1e-9 or overlap_h < 1 - 1e-9:
        assert iou(a, b) == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("The answer is C.", "C"),
        ("no letter here", None),
        ("ABC.", None),  # preceded by a capital: not a choice
        ("Options C; final answer: D.", "D"),  # C: ANSWER +1 = 1; D: ANSWER +1, late +2 = 3
        ("A. 不对, 答案是 B.", "B"),  # A: 对 答案 是 +3, '.' +1 = 4; B: +3, late +2, '.' +1 = 6
        ("答案是 D。", None),  # '。' is not in the look-ahead set
        ("A, or maybe... I think the answer is B.", "A"),  # B is scored at the B of MAYBE: 1 (THINK) vs A's ',' 1
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_extract_choice_scores_a_letter_at_its_first_occurrence():
    # 'A' first occurs inside 'AN' of 'AN APPLE' (position 0): no keyword, not late; 'B' is late (+2): B wins.
    assert extract_choice("an apple is A, or B") == "B"


@pytest.mark.parametrize(
    "content, solution, expected",
    [
        ("<think>..</think><answer>B</answer>", "<answer> B </answer>", 1.0),
        ("<answer>(b).</answer>", "<answer> B </answer>", 0.0),  # '(B).': B preceded by '(' is fine, but ')' follows
        ("<answer>B.</answer>", "<answer> B </answer>", 1.0),
        ("B", "<answer> B </answer>", 1.0),  # untagged completion: the whole text
        ("<answer>C</answer>", "<answer> B </answer>", 0.0),
        ("<answer>B</answer>", "<answer> banana </answer>", 0.0),  # no letter in the truth: raw solution text
    ],
)
def test_mcq(content, solution, expected):
    assert mcq_score(content, solution) == expected


@pytest.mark.parametrize(
    "content, solution, expected",
    [
        ("<answer>Yes, it is.</answer>", "<answer> yes </answer>", 1.0),
        ("<answer>No</answer>", "<answer> yes </answer>", 0.0),
        ("<answer>I know</answer>", "<answer> no </answer>", 1.0),  # 'know' contains 'no' (VLM-R1 substring search)
        ("<answer>maybe</answer>", "<answer> red </answer>", 1.0),  # neither side says yes/no: '' == ''
        ("<answer>maybe</answer>", "<answer> yes </answer>", 0.0),
    ],
)
def test_yes_no(content, solution, expected):
    assert yes_no_score(content, solution) == expected


@pytest.mark.parametrize(
    "content, expected",
    [
        ("<think>a</think><answer>b</answer>", 1.0),
        ("<think>a</think>\n\n<answer>b</answer>", 1.0),
        ("<think></think><answer></answer>", 1.0),
        (" <think>a</think><answer>b</answer>", 0.0),  # leading text
        ("<think>a</think><answer>b</answer>.", 0.0),  # trailing text
        ("<think>a</think>x<answer>b</answer>", 0.0),
        ("<answer>b</answer>", 0.0),
    ],
)
def test_format_reward(content, expected):
    assert format_reward([content]) == [expected]


@pytest.mark.parametrize(
    "content, expected",
    [
        ('<think>a</think><answer>{"bbox_2d": [1, 2, 30, 40]}</answer>', 1.0),
        ('pre <think>a</think> <answer>{"bbox": [1,2,3,4]}</answer> post', 1.0),  # text outside is allowed
        ("<think>a</think><answer>[1, 2, 30, 40]</answer>", 0.0),  # braces required
        ('<think>a</think><answer>{"bbox_2d": [1.5, 2, 30, 40]}</answer>', 0.0),  # integers only
        ('<think>a</think><answer>{"bbox_2d": [-1, 2, 30, 40]}</answer>', 0.0),
        ('<answer>{"bbox_2d": [1, 2, 30, 40]}</answer>', 0.0),
    ],
)
def test_rec_format_reward(content, expected):
    assert format_reward_rec([content]) == [expected]


@given(st.one_of(snippets, near_matches()))
@settings(max_examples=2000, deadline=None)
def test_linear_format_checks_agree_with_the_spec_regexes(text):
    for candidate in (text, "<think>" + text, "<think>" + text + "</answer>"):
        assert has_think_answer_format(candidate) == bool(FORMAT_RE.fullmatch(candidate))
        assert has_rec_format(candidate) == bool(REC_FORMAT_RE.search(candidate))
        match = BOX_ARRAY_RE.search(candidate)
        assert find_box_array(candidate) == (match.group(0) if match else None)


# VLM-R1's tag regexes: the references for the str.find scans.
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
ANSWER_LINE_RE = re.compile(r"<answer>(.*?)</answer>")
JSON_BLOCK_RE = re.compile(r"```json(.*?)```", re.DOTALL)
FENCE_RE = re.compile(r"```(.*?)```", re.DOTALL)
TAG_PIECES = [
    "<answer>",
    "</answer>",
    "<answer",
    "answer>",
    "</",
    "\n",
    "\r",
    " ",
    "x",
    "```json",
    "```",
    "``",
    "`",
    "json",
    "<answer>\n</answer>",
]


def _group(match):
    return match.group(1) if match else None


@given(st.lists(st.sampled_from(TAG_PIECES), max_size=16).map("".join))
@settings(max_examples=3000, deadline=None)
def test_linear_tag_scans_agree_with_the_vlmr1_regexes(text):
    assert first_answer(text) == _group(ANSWER_RE.search(text))
    assert first_answer(text, one_line=True) == _group(ANSWER_LINE_RE.search(text))
    found = ANSWER_RE.findall(text)
    assert last_answer(text) == (found[-1] if found else None)
    found = JSON_BLOCK_RE.findall(text)
    assert json_block(text, last=True) == (found[-1].strip() if found else None)
    assert json_block(text, last=False) == (found[0].strip() if found else None)
    assert first_between(text, "```", "```") == _group(FENCE_RE.search(text))


def vlmr1_extract_choice(text: str) -> str | None:
    """VLM-R1's `extract_choice` loop: a `str.find` per candidate occurrence (the reference for the linear one)."""
    text = re.sub(r"\s+", " ", text.upper())
    choices = re.findall(r"(?<![A-Z])([A-Z])(?=[\.\,\?\!\:\;]|$)", text)
    if not choices:
        return None
    if len(choices) == 1:
        return choices[0]
    keywords = [
        "答案",
        "选择",
        "正确",
        "是",
        "对",
        "answer",
        "correct",
        "choose",
        "select",
        "right",
        "认为",
        "应该",
        "觉得",
        "think",
        "believe",
        "should",
    ]
    scores = dict.fromkeys(choices, 0)
    for c in choices:
        pos = text.find(c)
        context = text[max(0, pos - 20) : min(len(text), pos + 20)]
        for keyword in keywords:
            if keyword.upper() in context:
                scores[c] += 1
        if pos > len(text) * 0.7:
            scores[c] += 2
        if pos < len(text) - 1 and text[pos + 1] in "。.!！,，":
            scores[c] += 1
    return max(scores.items(), key=lambda x: x[1])[0]


CHOICE_PIECES = [
    "A",
    "B",
    "C",
    "a",
    ".",
    ",",
    ";",
    "!",
    " ",
    "\n",
    "x",
    "AB",
    "答案",
    "是",
    "answer",
    "THINK",
    "。",
    "xxxxxxxxxx",
    "(",
    ")",
]


@given(st.lists(st.sampled_from(CHOICE_PIECES), max_size=30).map("".join))
@settings(max_examples=3000, deadline=None)
def test_extract_choice_agrees_with_vlmr1s_loop(text):
    assert extract_choice(text) == vlmr1_extract_choice(text)
