"""Run identity: a run folder belongs to the configuration that started it. Resuming it with another configuration
would silently continue the old run under a new name, so it is refused, naming the differing keys; only the run's
length, logging and checkpoint cadence may change between lives."""

from __future__ import annotations

import json
from typing import Any

# Keys a resumed run may change: how long it runs, how it logs and checkpoints, where it was started from.
RESUMABLE = frozenset(
    {
        "train.max_steps",
        "data.num_epochs",
        "train.log_every",
        "train.eval_every",
        "train.save_every",
        "train.keep_checkpoints",
        "train.rollout_log",
        "train.max_nonfinite_steps",
        "train.output_dir",
        "train.distributed",
    }
)


class RunMismatch(ValueError):
    """The run folder holds a run of another configuration."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: stored -> current` for every setting that differs, except the RESUMABLE ones and keys the stored
    config predates (settings added to the code later, at their defaults); values compared as JSON."""
    normal = lambda d: _flat(json.loads(json.dumps(d, default=str)))  # tuples vs lists
    old, new = normal(stored), normal(current)
    return [
        f"{k}: {old[k]!r} -> {new.get(k, '(absent)')!r}"
        for k in sorted(set(old) - RESUMABLE)
        if old[k] != new.get(k, "(absent)")
    ]


def check_resume(stored: dict[str, Any], current: dict[str, Any], kind: str, stored_kind: str, where: str) -> None:
    """Refuse to resume the run in `where` (a checkpoint folder) with a different configuration or trainer."""
    differences = config_differences(stored, current)
    if stored_kind != kind:
        differences.insert(0, f"trainer: {stored_kind!r} -> {kind!r}")
    if differences:
        listed = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        raise RunMismatch(
            f"{where} holds a run with another configuration ({listed}). Either start a new run "
            f"with train.output_dir=NEW_FOLDER, or continue this one with the new settings by "
            f"passing --resume-anyway"
        )
