"""Shared session folders stay unchanged: a digest of every file, compared when the session ends."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """Yield `folder`; afterwards fail, naming the files, if anything under it was added, removed or changed (a test
    that writes must copy the folder to its own tmp_path first)."""
    before = folder_digest(folder)
    yield folder
    after = folder_digest(folder)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into the shared folder {folder}: {changed}; copy it to tmp_path first"


def flip_bytes(path: Path, count: int = 4096) -> None:
    """Invert `count` bytes in the middle of `path` (bit rot in a stored array)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + count] = bytes(b ^ 0xFF for b in data[mid : mid + count])
    path.write_bytes(bytes(data))
