"""Our parameter tree -> HF Qwen2.5-VL safetensors: the writing side (the reader is vlmr1_jax/models/hf_weights.py);
the layout is the model family's table (`ModelFamily.layout`). Writing emits the legacy names every reader accepts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from converters.safetensors_io import save_tensors
from vlmr1_jax.filenames import CHECKSUMS_FILE
from vlmr1_jax.models.family import family_of


def write_checksums(model_dir: str | os.PathLike, tensors: Mapping[str, tuple[str, tuple[int, ...], str]]) -> None:
    """The checksum manifest of a folder: name -> (safetensors dtype code, shape, sha256 of the bytes)."""
    data = {
        "algorithm": "sha256",
        "tensors": {n: {"dtype": d, "shape": list(s), "sha256": h} for n, (d, s, h) in tensors.items()},
    }
    (Path(model_dir) / CHECKSUMS_FILE).write_text(json.dumps(data, indent=1) + "\n")


def hf_tensors(state: nnx.State, cfg: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(legacy HF name, numpy array in the HF layout) for every tensor HF stores, one at a time (one layer of a
    stacked parameter gathered to the host), in `hf_entries` order."""
    layout = family_of(cfg).layout
    params = layout.flat_paths(state)
    for name, path, layer, _ in layout.hf_entries(state):
        value = params[path][...]
        yield name, layout.to_hf_tensor(path, np.asarray(jax.device_get(value if layer is None else value[layer])), cfg)


def save_hf_safetensors(state: nnx.State, cfg: Any, path: str | os.PathLike, dtype=None) -> None:
    """Write every parameter into one safetensors file with legacy names and `{"format": "pt"}` metadata."""
    tensors = {name: value if dtype is None else value.astype(dtype) for name, value in hf_tensors(state, cfg)}
    save_tensors(tensors, path)
