"""Math evaluation: a known answer set (free form and multiple choice, VLM-R1's methods) scored as its accuracy
reward scores it; a sample counts as correct only with reward 1.0."""

from __future__ import annotations

import pytest

from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.eval.math import math_records, summarize_math

# (solution, method, completion, correct, reward)
CASES = [
    ("3/4", "default", "<think>3 of 4</think><answer>0.75</answer>", True, 1.0),  # math_verify: 3/4 == 0.75
    ("\\frac{1}{2}", "default", "<answer>1/2</answer>", True, 1.0),
    ("6", "default", "<answer>5</answer>", False, 0.0),  # numbers compared as floats
    ("B", "default", "<answer>B</answer>", True, 1.0),  # a choice letter
    ("B", "default", "<answer>C.</answer>", False, 0.0),
    ("2", "math", "<answer>so \\boxed{2}</answer>", True, 1.0),
    ("C", "mcq", "<answer>The answer is C.</answer>", True, 1.0),
    ("C", "mcq", "<answer>A</answer>", False, 0.0),
    ("red", "default", "<answer>reed</answer>", False, 2 * 3 / 7),  # Levenshtein ratio: partial credit only
    ("7", "default", "no answer tag, just 7", True, 1.0),  # the whole completion is the answer
]


def test_known_answer_set():
    samples = [
        Sample(i, f"q{i}", f"<answer> {solution} </answer>", (), method, "bench.json", i + 1)
        for i, (solution, method, *_rest) in enumerate(CASES)
    ]
    records = math_records(samples, [c for _, _, c, _, _ in CASES])
    assert [r["correct"] for r in records] == [c for *_x, c, _ in CASES]
    assert [r["reward"] for r in records] == pytest.approx([r for *_x, r in CASES])
    summary = summarize_math(records)
    assert summary["accuracy"] == pytest.approx(100.0 * 6 / 10) and summary["n"] == 10
    assert summary["mean_reward"] == pytest.approx((6 + 6 / 7) / 10)
