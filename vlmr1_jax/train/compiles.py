"""How many programs this process has lowered for XLA: a metric (`compilations`) that must stop growing after the
first steps; growth later means a shape or a static argument changes from step to step (a recompile per step)."""

from __future__ import annotations

import threading

import jax
from jax._src.dispatch import JAXPR_TO_MLIR_MODULE_EVENT  # the event name jax records per lowering

_lock = threading.Lock()
_count = 0
_installed = False


def _on_event(event: str, duration_secs: float, **kwargs: str | int) -> None:
    global _count
    if event == JAXPR_TO_MLIR_MODULE_EVENT:
        with _lock:
            _count += 1


def compilations() -> int:
    """Lowerings since the counter was first asked for (it starts listening then), persistent-cache hits included."""
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _installed = True
        return _count
