"""Keep library noise off the user's terminal unless `--debug`: absl / orbax INFO logs, and the tracebacks that
orbax's and tensorstore's writer threads print straight to stderr when a write fails (a full disk gives hundreds).
The error itself still reaches the command, which prints it as one `error:` line."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import TextIO


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def quiet_libraries() -> None:
    """Silence absl / orbax INFO chatter (hundreds of lines a run); warnings still show, errors come back to the
    command as exceptions."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # orbax logs a failed background write as ERROR (absl), and asyncio its orphaned futures, before the error is
    # re-raised to the command, which reports it once.
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_below_error)  # the same function each call: added once
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


class TracebackFilter(io.TextIOBase):
    """A stderr that drops every Python traceback block (from `Traceback (most recent call last):` through its
    exception line) and counts them; everything else passes through unchanged. Threads print their tracebacks in
    pieces that interleave, so each thread's text is followed on its own; lines are written whole."""

    HEADER = "Traceback (most recent call last):"

    def __init__(self, target: TextIO):
        self.target = target
        self.dropped = 0
        self._pending: dict[int, str] = {}  # thread -> text after its last newline
        self._in_traceback: set[int] = set()
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        thread = threading.get_ident()
        with self._lock:
            *lines, rest = (self._pending.pop(thread, "") + text).split("\n")
            for line in lines:
                self._line(thread, line + "\n")
            if rest and thread not in self._in_traceback and not self.HEADER.startswith(rest):
                self.target.write(rest)  # progress bars redraw a line without a newline
            elif rest:
                self._pending[thread] = rest
        return len(text)

    def _line(self, thread: int, line: str) -> None:
        if line.startswith(self.HEADER):
            self._in_traceback.add(thread)
        elif thread in self._in_traceback:
            if not line.startswith((" ", "\t", "\n", "During handling", "The above exception")):
                self._in_traceback.discard(thread)  # the exception line ends the block
                self.dropped += 1
        else:
            self.target.write(line)

    def flush(self) -> None:
        with self._lock:
            for thread, rest in list(self._pending.items()):
                if thread not in self._in_traceback:
                    self.target.write(rest)
                    del self._pending[thread]
            self.target.flush()


@contextlib.contextmanager
def without_background_tracebacks() -> Iterator[TracebackFilter]:
    """Route stderr through a `TracebackFilter` for the block; say once at the end how many were hidden."""
    original = sys.stderr
    stream = TracebackFilter(original)
    sys.stderr = stream
    try:
        yield stream
    finally:
        stream.flush()
        sys.stderr = original
        if stream.dropped:
            print(
                f"({stream.dropped} tracebacks from background threads hidden; `vlmr1 --debug ...` shows them)",
                file=original,
            )
