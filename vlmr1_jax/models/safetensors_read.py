"""Safetensors files read one tensor at a time with plain reads (no memory map), so loading holds one tensor on the
host whatever the size of the file or of the model (the writer is converters/safetensors_io.py).

The format: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, data_offsets relative to
the end of the header; `__metadata__` a str -> str map), then the tensors' bytes back to back.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

MAX_HEADER_BYTES = 100 * 1024 * 1024
# Bytes per element of every safetensors dtype code (the checker sizes tensors of any type with it).
ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
# Safetensors dtype codes of the floating types checkpoints use: the ones read here.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


def dtype_code(dtype: Any) -> str:
    """numpy dtype -> safetensors code ('F32', 'BF16', ...)."""
    for code, np_dtype in NUMPY_DTYPES.items():
        if np.dtype(dtype) == np_dtype:
            return code
    raise ValueError(f"dtype {np.dtype(dtype).name} has no safetensors code here; known: {sorted(NUMPY_DTYPES)}")


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype/shape/data_offsets, plus `__metadata__`) and
    `__header_bytes__`, where the data starts; ValueError naming the file when it is not a safetensors header."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length {length} is implausible (not a safetensors file?)")
        text = f.read(length)
    if len(text) != length:
        raise ValueError(f"{path}: truncated header ({len(text)} of {length} bytes)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    entry_keys = {"dtype", "shape", "data_offsets"}
    for name, info in header.items():
        if name != "__metadata__" and not (isinstance(info, dict) and entry_keys <= info.keys()):
            raise ValueError(f"{path}: malformed header entry for {name!r}")
    header["__header_bytes__"] = 8 + length
    return header


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(name -> {dtype, shape, data_offsets}, `__metadata__`, byte offset of the data) of a safetensors file;
    ValueError naming the file when the header is malformed or points past the end of the file."""
    path = Path(path)
    header = read_safetensors_header(path)
    start = header.pop("__header_bytes__")
    metadata = header.pop("__metadata__", None) or {}
    size = path.stat().st_size
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in NUMPY_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; only {sorted(NUMPY_DTYPES)} are read")
        want = int(np.prod(info["shape"], dtype=np.int64)) * NUMPY_DTYPES[info["dtype"]].itemsize
        if not 0 <= begin <= end or end - begin != want:
            raise ValueError(
                f"{path}: tensor {name!r} spans bytes {begin}..{end}, but {info['dtype']} {info['shape']} needs {want}"
            )
        if start + end > size:
            raise ValueError(
                f"{path}: tensor {name!r} ends at byte {start + end}, but the file has {size} bytes (truncated?)"
            )
    return header, metadata, start


def read_tensor(path: str | os.PathLike, info: dict[str, Any], data_start: int) -> np.ndarray:
    """One tensor of a file (its header entry `info`) read into a fresh array."""
    dtype = NUMPY_DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    out = np.empty(tuple(info["shape"]), dtype)
    view = out.reshape(-1).view(np.uint8).data
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        done = 0
        while done < end - begin:
            n = f.readinto(view[done:])
            if not n:
                raise ValueError(f"{path}: truncated while reading a tensor at byte {data_start + begin + done}")
            done += n
    return out


def sha256(array: np.ndarray) -> str:
    """Hex SHA-256 of an array's bytes (C order)."""
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data).hexdigest()
