"""Math answers (SPEC §2.3 `math`): math_verify, then the last `\\boxed{}` with hendrycks-MATH normalisation.

Mirrors VLM-R1's `utils/math.py::compute_score`, including which inputs fall back to a raw string comparison.
"""

from __future__ import annotations

import threading

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from vlmr1_jax.rewards.common import clean_text

_BOXED_SPACE = "\\boxed "
_BOXED_BRACE = "\\boxed{"


def verify_equal(student: str, truth: str) -> bool:
    """math_verify's `verify(parse(student), parse(truth)) > 0` (VLM-R1's argument order); any failure is False.

    math_verify times out with SIGALRM, which only works on the main thread; elsewhere it runs without a timeout.
    """
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(student, parsing_timeout=timeout)
        target = parse(truth, parsing_timeout=timeout)
        return float(verify(gold, target, timeout_seconds=timeout)) > 0
    except (Exception, TimeoutException):
        return False


def last_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces; `\\boxed x` up to the next '$'; else None."""
    if _BOXED_SPACE in text:
        return _BOXED_SPACE + text.split(_BOXED_SPACE)[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for end in range(start, len(text)):
        if text[end] == "{":
            depth += 1
        elif text[end] == "}":
            depth -= 1
            if depth == 0:
                return text[start:end + 1]
    return None


def remove_boxed(boxed: str) -> str | None:
    """Content of a `\\boxed ...` / `\\boxed{...}` string, or None for anything else (e.g. `\\fbox{}`)."""
    if _BOXED_SPACE in boxed:
        return boxed[len(_BOXED_SPACE):] if boxed.startswith(_BOXED_SPACE) else None
    if boxed.startswith(_BOXED_BRACE) and boxed.endswith("}"):
        return boxed[len(_BOXED_BRACE):-1]
    return None


def _fix_sqrt(text: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}`; a trailing bare `\\sqrt` cannot be normalised (ValueError)."""
    parts = text.split("\\sqrt")
    out = parts[0]
    for part in parts[1:]:
        if not part:
            raise ValueError("bare \\sqrt")
        out += "\\sqrt" + part if part[0] == "{" else "\\sqrt{" + part[0] + "}" + part[1:]
    return out


def _fix_fracs(text: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}`; gives up (unchanged) on a one-char tail."""
    parts = text.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if not part:
            raise ValueError("bare \\frac")
        if part[0] == "{":
            out += part
        elif len(part) < 2:
            return text
        elif part[1] != "{":
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            out += "{" + part[0] + "}" + part[1:]
    return out


def _fix_a_slash_b(text: str) -> str:
    """`3/4` -> `\\frac{3}{4}` for integer round-trips; a non-integer side raises ValueError (as int() does)."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    numerator, denominator = int(parts[0]), int(parts[1])
    return f"\\frac{{{numerator}}}{{{denominator}}}" if text == f"{numerator}/{denominator}" else text


def strip_string(text: str) -> str:
    """hendrycks-MATH answer normalisation (lm-eval-harness `strip_string`); ValueError where the original raises."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        text = text.replace(old, new)
    if "\\text{ " in text:  # units on the right
        parts = text.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("several \\text{ } units")
        text = parts[0]
    text = text.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        text = sides[1]
    text = _fix_fracs(_fix_sqrt(text).replace(" ", ""))
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _fix_a_slash_b(text)


def is_equiv(answer: str, truth: str) -> bool:
    """Equal after `strip_string`; where normalisation fails, equal as raw strings."""
    try:
        return strip_string(answer) == strip_string(truth)
    except ValueError:
        return answer == truth


def compute_score(answer: str, truth: str) -> float:
    """VLM-R1 `compute_score`: exact match, then math_verify, then the last boxed answer vs `truth` by `is_equiv`."""
    if answer == truth or verify_equal(answer, truth):
        return 1.0
    boxed = last_boxed(answer)
    if boxed is not None:
        answer = remove_boxed(boxed)
        if answer is None:
            return 0.0
    return 1.0 if is_equiv(answer, truth) else 0.0


def math_score(content: str, solution: str) -> float:
    """Accuracy method `math`: `compute_score(clean_text(content), clean_text(solution))`."""
    return compute_score(clean_text(content), clean_text(solution))
