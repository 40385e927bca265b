"""Dtype names users type: one vocabulary for every `--dtype` and every converter (a leaf module, no imports of ours).

Input accepts the long and the short spelling (`bfloat16` / `bf16`, `float16` / `fp16`, `float32` / `fp32`);
everything we print and store uses the long one, which is also config.json's `torch_dtype` and the jax name.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import ml_dtypes
import numpy as np


@dataclasses.dataclass(frozen=True)
class DType:
    """One floating dtype under the names the file formats use."""

    name: str  # canonical: config.json torch_dtype, jax / numpy name
    safetensors: str  # safetensors header code
    numpy: Any  # numpy scalar type (ml_dtypes for bfloat16)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("bfloat16", "BF16", ml_dtypes.bfloat16),
        DType("float16", "F16", np.float16),
        DType("float32", "F32", np.float32),
    )
}
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_CHOICES = f"choose one of {', '.join(DTYPES)} (or {', '.join(ALIASES)})"


def canonical_dtype(name: str, field: str = "dtype") -> str:
    """Any accepted spelling -> the canonical name; ValueError naming `field` and the choices otherwise."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"{field}={name!r}: unknown dtype; {_CHOICES}")
    return key


def dtype_info(name: str, field: str = "dtype") -> DType:
    """The `DType` of any accepted spelling."""
    return DTYPES[canonical_dtype(name, field)]


def dtype_arg(text: str) -> str:
    """argparse `type=` for a --dtype option: the canonical name (pair it with `choices=` to narrow the set)."""
    try:
        return canonical_dtype(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a dtype; {_CHOICES}") from None
