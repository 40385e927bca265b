"""Safetensors files written one tensor at a time with plain writes, so a conversion holds one tensor on the host
whatever the size of the file or of the model (the reader is vlmr1_jax/models/safetensors_read.py).

The writer knows every name, dtype and shape up front (a release's shard plan), writes the header first and then
each tensor's bytes as it arrives. Files written here read back with the safetensors library and transformers.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmr1_jax.models.safetensors_read import NUMPY_DTYPES

_ALIGN = 8  # the header is padded with spaces so tensor data starts 8-byte aligned, as the library does


class ShardWriter:
    """Write one safetensors file whose tensors (name, dtype code, shape; in this order) are known up front:
    the header at once, then each tensor's bytes with `write`. Use as a context manager; `close` checks that
    every tensor arrived."""

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Sequence[tuple[str, str, Sequence[int]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        self._pending: list[tuple[str, str, tuple[int, ...]]] = []
        offset = 0
        for name, code, shape in specs:
            nbytes = int(np.prod(shape, dtype=np.int64)) * NUMPY_DTYPES[code].itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._pending.append((name, code, tuple(shape)))
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % _ALIGN)
        self._file = open(self.path, "wb")  # noqa: SIM115 -- open across write() calls, closed by close()
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._pending.reverse()

    def write(self, name: str, array: np.ndarray) -> None:
        """Append the next tensor; it must be the next one of the header, with its dtype and shape."""
        if not self._pending:
            raise ValueError(f"{self.path}: tensor {name!r} is one more than the header lists")
        want_name, code, shape = self._pending.pop()
        if name != want_name or array.dtype != NUMPY_DTYPES[code] or tuple(array.shape) != shape:
            raise ValueError(
                f"{self.path}: got {name!r} {array.dtype.name}{list(array.shape)}, the header's next "
                f"tensor is {want_name!r} {NUMPY_DTYPES[code].name}{list(shape)}"
            )
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)

    def close(self) -> None:
        self._file.close()
        if self._pending:
            raise ValueError(
                f"{self.path}: closed before {len(self._pending)} tensors were written, e.g. {self._pending[-1][0]!r}"
            )

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def save_tensors(tensors: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """safetensors' `save_file` with `{"format": "pt"}` metadata, given the usual file permissions (the library
    creates its files 0600 whatever the umask, unlike every other file of a release)."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
