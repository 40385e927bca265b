"""Bounded reward cost on adversarial model output: every registered reward and every accuracy method parses a
1 MB completion in linear time, and math_verify / json_repair stop at their per-sample time limit in any thread.

Linear time is checked by scaling, not by a deadline: a timed assert breaks on a slow or busy machine, while the
ratio of two sizes timed moments apart in the same process does not depend on the machine. For 100x the text a
linear parser costs about 100x (up to ~170x measured, with cache effects); a quadratic one 10,000x (VLM-R1's
`<answer>(.*?)</answer>` on repeated unclosed tags: 9 s at 128 kB). The bound RATIO = 500 has a 3x margin above the
first and 20x below the second. A size is timed with the garbage collector off, and a pair over the bound is timed
again (best of 3) so one interruption by another process does not fail the test. The 1 MB call is abandoned (SIGALRM)
once it has taken RATIO times the small one, so a quadratic regression fails in a minute instead of hours.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
import time

import pytest
from PIL import Image

from vlmr1_jax.rewards import REWARDS, get_reward, math_answer, sandbox
from vlmr1_jax.rewards.accuracy import _methods
from vlmr1_jax.rewards.length import _load_json

SMALL, BIG = 10_000, 1_000_000
RATIO = 500
BOX = '{"bbox_2d": [1, 2, 30, 40], "label": "cat"}'
BLOCK = "```json\n[" + BOX + "]\n```"


def _repeat(piece: str, n: int) -> str:
    return (piece * (n // len(piece) + 1))[:n]


def _boxes(n: int) -> str:
    return "[" + ", ".join([BOX] * (n // (len(BOX) + 2))) + "]"


# name -> completion of about n characters
CASES = {
    "unclosed answer tags": lambda n: _repeat("<answer>", n),
    "answers, then unclosed tags": lambda n: "<answer>7</answer>" + _repeat("<answer>\n", n),
    "unclosed json fences": lambda n: _repeat("```json", n),
    "think then many bridges": lambda n: "<think>" + _repeat("</think> <answer>", n),
    "many boxes in braces": lambda n: "<think></think><answer>{" + _repeat("[1,2,3,4]}", n),
    "nested brackets in a fence": lambda n: "<answer>```json\n" + _repeat("[", n) + "\n```</answer>",
    "open braces in a fence": lambda n: "```json\n" + _repeat("{", n) + "\n```",
    "huge box list": lambda n: "<think>x</think><answer>```json\n" + _boxes(n) + "\n```</answer>",
    "truncated box list": lambda n: "<answer>```json\n" + _boxes(n)[:-1] + "\n```</answer>",
    "bare truncated box list": lambda n: _boxes(n)[:-1],
    "digit run": lambda n: "<answer>[1, 2, 3, " + _repeat("9", n) + "]</answer>",
    "choice letters late": lambda n: _repeat("x", n // 2) + _repeat(" A.", n // 2),
    "power tower": lambda n: "<answer>" + _repeat("2^", n) + "2</answer>",
    "boxed and fractions": lambda n: _repeat("\\boxed{\\frac12\\sqrt3 ", n),
    "long words": lambda n: _repeat("the cat sat on a mat yes no ", n),
    "whitespace then text": lambda n: _repeat(" \n", n) + "<answer> 42 </answer>",
}

TRUTHS = {
    "mcq": "B",
    "yes_no": "yes",
    "llm": "Paris",
    "all_match": "x",
    "math": "\\frac{1}{2}",
    "default": "42",
    "weighted_sum": BLOCK,
    "map": BLOCK,
    "od_ap": BLOCK,
    "od_ap50": BLOCK,
    "odLength": BLOCK,
}


@pytest.fixture(scope="module")
def calls(tmp_path_factory) -> dict:
    """name -> fn(completion) -> scores, for every registered reward and every accuracy method."""
    image = tmp_path_factory.mktemp("bounded") / "img.png"
    Image.new("RGB", (333, 517)).save(image)
    out = {
        "format": lambda c: get_reward("format")([c]),
        "rec_format": lambda c: get_reward("rec_format")([c]),
        "rec_format_plain": lambda c: get_reward("rec_format_plain")([c]),
        "repetition": lambda c: get_reward("repetition")([c]),
        "length": lambda c: get_reward("length", count="bytes")([c], solution=[f"<answer> {BLOCK} </answer>"]),
        "rec_iou": lambda c: get_reward("rec_iou")(
            [c],
            solution=["<answer> [1, 2, 300, 400] </answer>"],
            model_image_size=[[[504, 336]]],
            image_path=[[str(image)]],
        ),
    }
    for method in _methods(None, False):
        out[f"accuracy:{method}"] = (
            lambda m: (
                lambda c: get_reward("accuracy")(
                    [c], solution=[f"<answer> {TRUTHS[m]} </answer>"], accu_reward_method=[m]
                )
            )
        )(method)
    return out


def test_every_reward_and_method_has_a_case(calls):
    names = {name.partition(":")[0] for name in calls}
    assert names == set(REWARDS), f"add a call for the new reward(s) {set(REWARDS) - names}"
    assert set(TRUTHS) == set(_methods(None, False))


class _Abandoned(BaseException):
    pass


def _abandon(signum, frame):
    raise _Abandoned


def _seconds(call, text: str, give_up_after: float = 0.0) -> float:
    """Seconds `call(text)` takes (inf once it has taken `give_up_after`, if given); checks the scores' range."""
    previous = signal.signal(signal.SIGALRM, _abandon)
    gc.disable()
    try:
        signal.setitimer(signal.ITIMER_REAL, give_up_after)
        start = time.perf_counter()
        scores = call(text)
        elapsed = time.perf_counter() - start
        signal.setitimer(signal.ITIMER_REAL, 0)
    except _Abandoned:
        return float("inf")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        gc.enable()
    assert all(isinstance(s, float) and -1.0 <= s <= 1.0 for s in scores), scores
    return elapsed


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["format", "rec_format", "rec_format_plain", "repetition", "length", "rec_iou", *(f"accuracy:{m}" for m in TRUTHS)],
)
def test_cost_grows_linearly_with_the_completion(name, calls, monkeypatch):
    monkeypatch.delenv("VLMR1_LLM_JUDGE_URL", raising=False)
    call = calls[name]
    call("<answer>1</answer>")  # first-use costs (the math_verify helper starts) are not part of the measure
    for case, make in CASES.items():
        small, big = make(SMALL), make(BIG)
        t_small = t_big = float("inf")
        for _ in range(3):
            t_small = min(t_small, _seconds(call, small))
            t_big = min(t_big, _seconds(call, big, give_up_after=RATIO * t_small))
            if t_big <= RATIO * t_small:
                break
        assert t_big <= RATIO * t_small, (
            f"{name} on {case!r}: {len(big)} chars take over {RATIO}x the time of "
            f"{len(small)} ({t_small:.4f} s for the small one): not linear"
        )


TOWER = "2^2^2^2^2^2"  # math_verify's comparison runs for minutes (5 s under its own timeout)


def _gave_up(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]


@pytest.mark.parametrize("in_thread", [False, True], ids=["main-thread", "other-thread"])
def test_math_verify_stops_at_the_time_limit(in_thread, monkeypatch, caplog):
    monkeypatch.setattr(math_answer, "VERIFY_SECONDS", 0.5)
    results = []

    def run() -> None:
        results.append(math_answer.verify_equal(TOWER, "2"))
        results.append(math_answer.verify_equal("\\frac{1}{2}", "0.5"))  # the helper still answers afterwards

    with caplog.at_level(logging.WARNING, logger=math_answer.__name__):
        if in_thread:
            thread = threading.Thread(target=run)
            thread.start()
            thread.join(120)  # a guard against hanging the suite, not a measure
            assert not thread.is_alive(), "verify_equal did not return off the main thread"
        else:
            run()
    assert results == [False, True]
    assert len(_gave_up(caplog)) == 1 and "interrupted after 0.5 s" in _gave_up(caplog)[0]


def test_accuracy_on_a_power_tower_goes_on_without_math_verify(monkeypatch, caplog):
    monkeypatch.setattr(math_answer, "VERIFY_SECONDS", 0.5)
    accuracy = get_reward("accuracy")
    got = accuracy(
        [f"<answer>{TOWER}</answer>"] * 2, solution=["<answer> 2 </answer>"] * 2, accu_reward_method=["math", "default"]
    )
    # math: not equal; default: not a float either, so the Levenshtein ratio 2 * LCS / (11 + 1) with LCS = "2"
    assert got == [0.0, pytest.approx(2 * 1 / (len(TOWER) + 1))] and len(_gave_up(caplog)) == 2


def test_a_helper_that_stops_answering_is_killed_and_replaced(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "GRACE_SECONDS", 0.2)
    monkeypatch.setattr(math_answer, "VERIFY_SECONDS", 0.2)
    assert math_answer.verify_equal("1", "1")
    pid = sandbox._HELPER._proc.pid
    os.kill(pid, signal.SIGSTOP)  # no SIGALRM can help now: the parent must kill it
    with caplog.at_level(logging.WARNING, logger=math_answer.__name__):
        assert not math_answer.verify_equal("1", "1")
    assert "no answer within 0.4 s, helper killed" in _gave_up(caplog)[0]
    assert math_answer.verify_equal("\\frac{1}{2}", "0.5") and sandbox._HELPER._proc.pid != pid


def test_long_inputs_skip_math_verify(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("math_verify was called")

    monkeypatch.setattr(sandbox, "call", refuse)
    long = "1" * (math_answer.VERIFY_MAX_CHARS + 1)
    assert not math_answer.verify_equal(long, "1") and not math_answer.verify_equal("1", long)
    assert math_answer.compute_score("\\boxed{7}" + long, "7") == 1.0  # the boxed fallback still reads it


def test_json_repair_stops_at_the_time_limit(monkeypatch, caplog):
    from vlmr1_jax.rewards import length

    monkeypatch.setattr(length, "REPAIR_SECONDS", 0.3)
    with caplog.at_level(logging.WARNING, logger=length.__name__):
        assert _load_json('["' * 8000) is None  # json_repair is quadratic on this: seconds
    assert "interrupted after 0.3 s" in _gave_up(caplog)[0]
    assert _load_json('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [1') == [
        {"bbox_2d": [1, 2, 3, 4], "label": "a"},
        {"bbox_2d": [1]},
    ]
    unclosed = json.dumps([1] * 10)[:-1] + ", 2"
    assert _load_json(unclosed) == [1] * 10 + [2]
    assert _load_json(unclosed + " " * length.REPAIR_MAX_CHARS) is None  # too long to repair
