"""REC evaluation protocols: how a model is asked for a box and how its answer is read (`--protocol`).

Built in: `r1` (VLM-R1's `test_rec_r1.py`, for GRPO checkpoints) and `baseline` (its `test_rec_baseline.py`, for base
and SFT models). A model family with its own protocol (another template, token budget, box format, or no rescale)
states it as its processor's `rec_eval` fields: it is then the default for that family's models and selectable by
the family's name. Others register with `register_protocol` or are named on the command line as
`package.module:ATTRIBUTE`; evaluation code never names a family.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable

from vlmr1_jax.models.family import ModelFamily, family_names, get_family

_FIRST_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BRACED_BOX = re.compile(r"\{.*\[(\d+),\s*(\d+),\s*(\d+),\s*(\d+)]\s*.*\}", re.DOTALL)
_ANY_BOX = re.compile(r"\[(\s*-?\d*\.?\d+\s*),\s*(\s*-?\d*\.?\d+\s*),\s*(\s*-?\d*\.?\d+\s*),\s*(\s*-?\d*\.?\d+\s*)\]")
NO_BOX = [0.0, 0.0, 0.0, 0.0]


def extract_box(completion: str) -> list[float]:
    """`r1`: the first `<answer>`, then the first braced `[x1, y1, x2, y2]` of non-negative integers; [0, 0, 0, 0]
    when absent."""
    answer = _FIRST_ANSWER.search(completion)
    match = _BRACED_BOX.search(answer.group(1)) if answer else None
    return [float(v) for v in match.groups()] if match else list(NO_BOX)


def extract_box_baseline(completion: str) -> list[float]:
    """`baseline`: the first `[a, b, c, d]` anywhere in the text, floats and negatives allowed; else [0, 0, 0, 0]."""
    match = _ANY_BOX.search(completion)
    return [float(v) for v in match.groups()] if match else list(NO_BOX)


@dataclasses.dataclass(frozen=True)
class RecProtocol:
    """A REC protocol: the question template, the decoding budget, the box parser, and whether boxes are mapped
    from the frame the model saw (its family's processor) back to the original image."""

    name: str
    task_type: str  # a template name of the family's processor ("rec", "default") or a "{Question} ..." string
    max_new_tokens: int
    extract_box: Callable[[str], list[float]]
    rescale: bool = True


R1 = RecProtocol("r1", "rec", 256, extract_box)
BASELINE = RecProtocol(
    "baseline", "{Question} Please provide the bounding box coordinate in JSON format.", 256, extract_box_baseline
)
_registry: dict[str, RecProtocol] = {p.name: p for p in (R1, BASELINE)}


def register_protocol(protocol: RecProtocol) -> RecProtocol:
    """Make `protocol` selectable by name (`--protocol NAME`); a second protocol under a taken name is an error."""
    known = _registry.get(protocol.name)
    if known is not None and known is not protocol:
        raise ValueError(f"REC protocol {protocol.name!r} is already registered")
    _registry[protocol.name] = protocol
    return protocol


def family_protocol(family: ModelFamily) -> RecProtocol:
    """The default protocol for a model of `family`: its own (its processor's `rec_eval`, named after the family)
    where it states one, else `r1`."""
    fields = family.processor.rec_eval
    return RecProtocol(family.name, **fields) if fields else R1


def protocol_names() -> list[str]:
    """Registered protocols and the families' own."""
    own = [name for name in family_names() if get_family(name).processor.rec_eval]
    return sorted({*_registry, *own})


def get_protocol(name: str) -> RecProtocol:
    """A registered protocol by name, or a `RecProtocol` object named as `package.module:ATTRIBUTE`."""
    if name in _registry:
        return _registry[name]
    if name in family_names() and get_family(name).processor.rec_eval:
        return family_protocol(get_family(name))
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"--protocol {name!r}: unknown; choose one of {protocol_names()} or name one as package.module:ATTRIBUTE"
        )
    try:
        value = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"--protocol {name!r}: cannot import it ({err})") from None
    if not isinstance(value, RecProtocol):
        raise ValueError(f"--protocol {name!r}: is a {type(value).__name__}, not a RecProtocol")
    return value
