"""Training logs: scalar metrics as JSONL + TensorBoard, and per-step rollouts (VLM-R1's DEBUG_MODE log) as JSONL.

Metric names follow VLM-R1 (docs/facts.md: Loss): completion_length, rewards/<function name> (`rewards/iou_reward` for
the `rec_iou` reward; `rewards.reward_functions` names them), reward, reward_std, kl, clip_ratio,
loss, grad_norm, learning_rate, epoch, plus time/sample, time/score, time/train and tokens_per_second.
Only process 0 writes metrics. A resumed run continues the same files after dropping the records of steps past its
checkpoint (they are logged again as those steps rerun; TensorBoard purges them too), so every step appears once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
TENSORBOARD_DIR = "tb"


def _scalar(value: Any) -> float | None:
    """A metric value as a JSON-safe float; NaN / inf become None (JSON null), so the file stays standard JSON."""
    x = float(value)
    return x if math.isfinite(x) else None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop the records of `path` with a step after `last_step` (and a line cut short by a kill), atomically."""
    if not path.is_file():
        return
    kept = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(record.get("step", 0)) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, path)


def mean_metrics(window: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Average each metric over the steps of a logging window that report it (VLM-R1 `log()`); None is skipped."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for metrics in window:
        for name, value in metrics.items():
            if value is None:
                continue
            sums[name] = sums.get(name, 0.0) + float(value)
            counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sums}


class MetricsWriter:
    """`run_dir/metrics.jsonl` (one `{"step": s, name: value, ...}` line per call) and TensorBoard scalars."""

    def __init__(
        self, run_dir: str | Path, tensorboard: bool = True, process_index: int = 0, resume_step: int | None = None
    ):
        """`resume_step`: the step a resumed run restarts after; later records are dropped (see module doc)."""
        self.enabled = process_index == 0
        self.path = Path(run_dir) / METRICS_FILE
        self._file: TextIO | None = None
        self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported here: it pulls in protobuf

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(logdir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log `metrics` (floats, numpy or jax scalars) at `step` and flush both sinks."""
        if not self.enabled:
            return
        assert self._file is not None, f"{self.path}: write after close"
        values = {name: _scalar(value) for name, value in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, float("nan") if value is None else value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl`, one per step in step order (a step logged twice keeps its last)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a training run folder?)")
    by_step: dict[int, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{number}: not a metrics record ({type(e).__name__}: {e})") from None
            by_step[step] = record
    if not by_step:
        raise ValueError(f"{path} has no metrics records")
    return [by_step[s] for s in sorted(by_step)]


class RolloutLog:
    """`run_dir/rollouts.jsonl`: one line per completion with its step, prompt, text and each reward function's score.

    Process 0 writes `rollouts.jsonl`; process k > 0 writes `rollouts.process<k>.jsonl` (rollouts are per process).
    """

    def __init__(self, run_dir: str | Path, process_index: int = 0, resume_step: int | None = None):
        name = ROLLOUTS_FILE if process_index == 0 else f"rollouts.process{process_index}.jsonl"
        self.path = Path(run_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        self._file = self.path.open("a", encoding="utf-8")

    def write(
        self,
        step: int,
        prompts: Sequence[str],
        completions: Sequence[str],
        rewards: Mapping[str, Sequence[float]],
        extra: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        """Log one step's rollouts. Completions come in groups of G consecutive rows per prompt
        (G = len(completions) / len(prompts)); `rewards` and `extra` (e.g. solution, advantage) have one value per row.
        """
        rows = len(completions)
        if not prompts or rows % len(prompts):
            raise ValueError(f"{rows} completions cannot be split into groups for {len(prompts)} prompts")
        group = rows // len(prompts)
        columns = {**{f"rewards/{k}": v for k, v in rewards.items()}, **(extra or {})}
        for name, column in columns.items():
            if len(column) != rows:
                raise ValueError(f"rollout log: '{name}' has {len(column)} values for {rows} completions")
        for i, completion in enumerate(completions):
            record = {
                "step": int(step),
                "prompt_index": i // group,
                "prompt": prompts[i // group],
                "completion": completion,
                "rewards": {name: _scalar(values[i]) for name, values in rewards.items()},
                **{name: _plain(values[i]) for name, values in (extra or {}).items()},
            }
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RolloutLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _plain(value: Any) -> Any:
    """numpy / jax scalars as Python numbers (non-finite floats as None); other values unchanged (they must be JSON)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    return _scalar(value) if isinstance(value, float) else value
