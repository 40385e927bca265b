"""Math answers (`accu_reward_method` `math`): math_verify, then the last `\\boxed{}` with hendrycks-MATH normalisation.

Mirrors VLM-R1's `utils/math.py::compute_score`, including which inputs fall back to a raw string comparison.
math_verify runs under a per-sample time limit on inputs of bounded length (see `verify_equal`).
"""

from __future__ import annotations

import logging

from vlmr1_jax.rewards import sandbox
from vlmr1_jax.rewards.common import clean_text

# Longer inputs (a few thousand tokens) are not answers and skip math_verify, whose extraction regexes are up to
# cubic in the length (2 kB of `\\boxed{\\(` take 1 s, 4 kB 8 s).
VERIFY_MAX_CHARS = 8192
# One sample's parse + parse + verify; plain answers take milliseconds, a power tower `2^2^2^2^2^2` runs for ever.
VERIFY_SECONDS = 2.0
_log = logging.getLogger(__name__)

_BOXED_SPACE = "\\boxed "
_BOXED_BRACE = "\\boxed{"


def verify_equal(student: str, truth: str) -> bool:
    """math_verify's `verify(parse(student), parse(truth)) > 0` (VLM-R1's argument order); any failure is False.

    Two limits VLM-R1 does not have: False without parsing when either side is longer than `VERIFY_MAX_CHARS`, and
    False when the whole check takes over `VERIFY_SECONDS` (enforced in any thread by `sandbox`; math_verify's own
    SIGALRM timeout works only on the main thread and allows 5 s per parse and per comparison).
    """
    if len(student) > VERIFY_MAX_CHARS or len(truth) > VERIFY_MAX_CHARS:
        return False
    try:
        return bool(sandbox.call("math_equal", student, truth, seconds=VERIFY_SECONDS))
    except sandbox.SandboxTimeout as err:
        _log.warning("math_verify gave up (%s) on %r vs %r: scored as not equal", err, student[:80], truth[:80])
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
                return text[start : end + 1]
    return None


def remove_boxed(boxed: str) -> str | None:
    """Content of a `\\boxed ...` / `\\boxed{...}` string, or None for anything else (e.g. `\\fbox{}`)."""
    if _BOXED_SPACE in boxed:
        return boxed[len(_BOXED_SPACE) :] if boxed.startswith(_BOXED_SPACE) else None
    if boxed.startswith(_BOXED_BRACE) and boxed.endswith("}"):
        return boxed[len(_BOXED_BRACE) : -1]
    return None


def _fix_sqrt(text: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}`; a trailing bare `\\sqrt` cannot be normalised (ValueError)."""
    parts = text.split("\\sqrt")
    out = [parts[0]]
    for part in parts[1:]:
        if not part:
            raise ValueError("bare \\sqrt")
        out.append("\\sqrt" + part if part[0] == "{" else "\\sqrt{" + part[0] + "}" + part[1:])
    return "".join(out)


def _fix_fracs(text: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}`; gives up (unchanged) on a one-char tail."""
    parts = text.split("\\frac")
    out = [parts[0]]
    for part in parts[1:]:
        if not part:
            raise ValueError("bare \\frac")
        if part[0] == "{":
            out.append("\\frac" + part)
        elif len(part) < 2:
            return text
        elif part[1] != "{":
            out.append("\\frac{" + part[0] + "}{" + part[1] + "}" + part[2:])
        else:
            out.append("\\frac{" + part[0] + "}" + part[1:])
    return "".join(out)


def _fix_a_slash_b(text: str) -> str:
    """`3/4` -> `\\frac{3}{4}` for integer round-trips; a non-integer side raises ValueError (as int() does)."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    numerator, denominator = int(parts[0]), int(parts[1])
    return f"\\frac{{{numerator}}}{{{denominator}}}" if text == f"{numerator}/{denominator}" else text


def strip_string(text: str) -> str:
    """hendrycks-MATH answer normalisation (lm-eval-harness `strip_string`); ValueError where the original raises."""
    for old, new in (
        ("\n", ""),
        ("\\!", ""),
        ("\\\\", "\\"),
        ("tfrac", "frac"),
        ("dfrac", "frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("\\$", ""),
    ):
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
        unboxed = remove_boxed(boxed)
        if unboxed is None:
            return 0.0
        answer = unboxed
    return 1.0 if is_equiv(answer, truth) else 0.0


def math_score(content: str, solution: str) -> float:
    """Accuracy method `math`: `compute_score(clean_text(content), clean_text(solution))`."""
    return compute_score(clean_text(content), clean_text(solution))
