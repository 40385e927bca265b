"""Helper process of `sandbox`: one JSON request per stdin line, `[op, seconds, args]`, one reply per stdout line.

Runs each call on its own main thread under SIGALRM, which interrupts Python code, regex searches and big-integer
arithmetic alike. Replies `{"result": value}` (None when the call raised) or `{"timeout": true}`; exits at EOF.
"""

import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from json_repair import repair_json
from math_verify import parse, verify


class TimeUp(BaseException):
    """Raised by SIGALRM (a BaseException, so that the libraries' `except Exception` let it through)."""


def _time_up(signum: int, frame: object) -> None:
    raise TimeUp


def math_equal(student: str, truth: str) -> bool:
    """math_verify's `verify(parse(student), parse(truth)) > 0` without its own timeouts (the alarm is ours)."""
    return (
        float(verify(parse(student, parsing_timeout=None), parse(truth, parsing_timeout=None), timeout_seconds=None))
        > 0
    )


OPS: dict[str, Callable[..., Any]] = {"math_equal": math_equal, "repair_json": repair_json}


def answer(op: str, seconds: float, args: list) -> dict:
    """The reply to one request; the alarm covers the call and any exception handling after it."""
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            reply = {"result": OPS[op](*args)}
        except Exception:  # noqa: BLE001 -- math_verify / json_repair fail many ways on model text
            reply = {"result": None}
        signal.setitimer(signal.ITIMER_REAL, 0)
    except TimeUp:
        reply = {"timeout": True}
    return reply


def main() -> None:
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its notice that its own timeout is off
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which then closes our stdin
    signal.signal(signal.SIGALRM, _time_up)
    math_equal("1", "1")  # load math_verify's grammars before the first timed call
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(answer(*json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
