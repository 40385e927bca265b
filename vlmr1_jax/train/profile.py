"""A `jax.profiler` trace of a window of training steps (`vlmr1 train --profile DIR`), for TensorBoard or Perfetto."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax

log = logging.getLogger(__name__)


def parse_steps(text: str) -> tuple[int, int]:
    """'N:M' (or 'N') -> the first and last step traced, 1-based and inclusive."""
    first, _, last = text.partition(":")
    try:
        window = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"--profile-steps {text!r}: give N:M, the first and last step to trace (e.g. 3:5)") from None
    if not 1 <= window[0] <= window[1]:
        raise ValueError(f"--profile-steps {text!r}: need 1 <= N <= M")
    return window


@dataclasses.dataclass
class StepProfile:
    """Traces steps `first`..`last` (the run's step numbers) into `directory`; steps before `first` compile."""

    directory: Path
    first: int
    last: int
    active: bool = False

    def before(self, first_step: int, last_step: int) -> None:
        """Called before the optimizer steps `first_step`..`last_step` of one rollout phase run; tracing starts
        with the phase that holds `first`."""
        if not self.active and first_step <= self.first <= last_step:
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int) -> None:
        """Called once step `step`'s results are on the host (its device work is done)."""
        if self.active and step >= self.last:
            self.stop()

    def stop(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
            log.info("profile of steps %d..%d written to %s", self.first, self.last, self.directory)
