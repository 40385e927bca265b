"""Multiple-choice and yes/no answers (VLM-R1 `extract_choice`, `mcq`, `yes_no`)."""

from __future__ import annotations

import re
from collections import Counter

from vlmr1_jax.rewards.common import first_answer

_CHOICE = re.compile(r"(?<![A-Z])([A-Z])(?=[\.\,\?\!\:\;]|$)")
_WHITESPACE = re.compile(r"\s+")
_YES_NO = re.compile(r"(yes|no)")
_KEYWORDS = tuple(
    k.upper()
    for k in (
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
    )
)
_CLOSING_PUNCT = "。.!！,，"


def extract_choice(text: str) -> str | None:
    """The answer letter in `text`: a lone capital followed by punctuation or the end; ties broken by VLM-R1's scores.

    Several candidates are scored: +1 per keyword within 20 chars, +2 past 70% of the text, +1 if punctuation follows.
    As in VLM-R1, a letter is located by its *first* occurrence in the text, a letter found twice is scored twice,
    and the first candidate wins ties. Each distinct letter is located once (VLM-R1 searches again per occurrence,
    quadratic on long text), its score times its count.
    """
    text = _WHITESPACE.sub(" ", text.upper())
    choices = _CHOICE.findall(text)
    if len(choices) <= 1:
        return choices[0] if choices else None
    scores = {}
    for choice, count in Counter(choices).items():  # in order of first appearance, as VLM-R1's dict
        pos = text.find(choice)
        context = text[max(0, pos - 20) : pos + 20]
        score = sum(keyword in context for keyword in _KEYWORDS)
        if pos > len(text) * 0.7:
            score += 2
        if pos < len(text) - 1 and text[pos + 1] in _CLOSING_PUNCT:
            score += 1
        scores[choice] = score * count
    return max(scores.items(), key=lambda item: item[1])[0]


def mcq_score(content: str, solution: str) -> float:
    """1.0 when the student's choice letter (first answer tag) equals the ground truth's, else 0.0."""
    truth = first_answer(solution, one_line=True)
    truth = truth.strip() if truth is not None else solution.strip()
    truth_choice = extract_choice(truth)
    # VLM-R1 falls back to the raw solution text, which a single letter then never equals.
    correct = truth_choice.upper() if truth_choice else solution.strip()
    answer = first_answer(content)
    student_choice = extract_choice(answer.strip() if answer is not None else content.strip())
    return 1.0 if student_choice and student_choice == correct else 0.0


def yes_no_score(content: str, solution: str) -> float:
    """1.0 when the first 'yes'/'no' substring (lowercased) agrees; also 1.0 when neither side has one (VLM-R1)."""
    content, solution = content.lower(), solution.lower()
    truth = first_answer(solution, one_line=True)
    truth = truth.strip() if truth is not None else solution.strip()
    answer = first_answer(content)
    answer = answer.strip() if answer is not None else content.strip()
    return 1.0 if _first_yes_no(truth) == _first_yes_no(answer) else 0.0


def _first_yes_no(text: str) -> str:
    match = _YES_NO.search(text)
    return match.group(1) if match else ""
