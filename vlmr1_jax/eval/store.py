"""Resumable evaluation results: an output folder we own (marker file), its settings, and per-dataset records
appended per batch to a checksummed jsonl, so a crash loses nothing already scored and a re-run skips it.

Each record line is `{"sha256": ..., "record": {...}}`; a batch is one write followed by fsync. On read a line that
does not parse or whose checksum fails (a write cut short by a kill) is dropped and the file rewritten without it,
so those samples are simply scored again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MARKER = ".vlmr1-eval"  # written into every evaluation folder: the only kind a re-run may resume or --overwrite clear
SETTINGS_FILE = "eval_settings.json"
RECORDS_SUFFIX = ".records.jsonl"


class StoreMismatch(ValueError):
    """The output folder holds results of another evaluation."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` through a synced temporary file and a rename (never half a file)."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    normal = lambda d: json.loads(json.dumps(d, default=str))
    old, new = normal(stored), normal(current)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def open_output(
    out: Path, settings: Mapping[str, Any], datasets: Mapping[str, Mapping[str, Any]], overwrite: bool
) -> None:
    """Make `out` the folder of this evaluation: create it, clear one we wrote (`overwrite`), or resume one we wrote
    with the same settings (datasets it already holds must be the same files; new ones are added). A folder
    without our marker is never touched."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a folder")
    ours = (out / MARKER).is_file()
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise FileExistsError(
            f"--out {out}: not a folder vlmr1 eval wrote (no {MARKER} marker), so it is neither resumed nor "
            "replaced; choose another --out"
        )
    if ours and overwrite:
        cwd, target = Path.cwd().resolve(), out.resolve()
        if target == cwd or target in cwd.parents:
            raise FileExistsError(f"--out {out}: is the current directory or one of its parents; refusing to clear it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stored_file = out / SETTINGS_FILE
    stored = json.loads(stored_file.read_text(encoding="utf-8")) if stored_file.is_file() else None
    known: dict[str, Any] = {}
    if stored is not None:
        differences = _differences(stored["settings"], settings)
        known = stored["datasets"]
        for name, data in datasets.items():
            if name in known:
                differences += [f"{name}.{d}" for d in _differences(known[name], data)]
        if differences:
            raise StoreMismatch(
                f"--out {out} holds results of another evaluation ({'; '.join(differences[:6])}); choose another "
                "--out, or pass --overwrite to discard them"
            )
    (out / MARKER).write_text("written by vlmr1 eval; a re-run resumes it, --overwrite clears it\n", encoding="utf-8")
    write_json_atomic(stored_file, {"settings": dict(settings), "datasets": {**known, **datasets}})


def _digest(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class RecordStore:
    """One dataset's scored records in `<folder>/<name>.records.jsonl`, keyed by `index` (position in the subset)."""

    def __init__(self, folder: Path, name: str):
        self.path = folder / f"{name}{RECORDS_SUFFIX}"

    def load(self) -> dict[int, dict]:
        """The verified records by index; unreadable lines are dropped from the file (their samples rerun)."""
        if not self.path.is_file():
            return {}
        records: dict[int, dict] = {}
        good, bad = [], 0
        with self.path.open("rb") as f:
            for raw in f:
                try:
                    line = json.loads(raw.decode("utf-8"))
                    record = line["record"]
                    if not raw.endswith(b"\n") or line["sha256"] != _digest(record):
                        raise ValueError("checksum")
                    index = int(record["index"])
                except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                    bad += 1
                    continue
                if index not in records:
                    records[index] = record
                    good.append(raw)
        if bad:
            temporary = self.path.with_name(f".{self.path.name}.tmp")
            with temporary.open("wb") as f:
                f.writelines(good)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        return records

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append a batch of records (each with an `index`) in one write, synced to disk before returning."""
        text = "".join(
            json.dumps({"sha256": _digest(r), "record": r}, ensure_ascii=False) + "\n" for r in records
        ).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(text)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
