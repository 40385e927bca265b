"""math_verify and json_repair in a helper process, under a per-call time limit that holds in any thread.

Both can run for minutes on odd model output: math_verify on a power tower `2^2^2^2^2^2`, json_repair on
`'["' * 16384`. In-process limits fail off the main thread: SIGALRM (math_verify's own timeout) works only there, and
an exception raised into a thread from another one waits for the end of a C call such as a huge integer power. The
helper (`sandbox_worker.py`, started on first use) runs each call on its main thread under SIGALRM; should that not
stop it, the parent kills the helper `GRACE_SECONDS` later and starts a new one for the next call. A call costs
about 0.1 ms more than in-process.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("sandbox_worker.py")
GRACE_SECONDS = 1.0


class SandboxTimeout(Exception):
    """The call did not finish within its time limit."""


class _Helper:
    """One helper process, started lazily, used by one thread at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner = os.getpid()

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="ascii"
        )
        if proc.stdout.readline().strip() != "ready":
            proc.kill()
            raise RuntimeError(
                f"the reward helper {WORKER} did not start (its error is printed above); check that "
                f"math_verify and json_repair import in {sys.executable}"
            )
        return proc

    def call(self, op: str, args: list, seconds: float) -> Any:
        with self._lock:
            if self._owner != os.getpid():  # a forked child: the helper's pipes belong to the parent
                self._proc, self._owner = None, os.getpid()
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            proc = self._proc
            try:
                proc.stdin.write(json.dumps([op, seconds, args]) + "\n")
                proc.stdin.flush()
                # One reply line per request, read whole: nothing is left in the reader's buffer for select to miss.
                ready, _, _ = select.select([proc.stdout], [], [], seconds + GRACE_SECONDS)
                line = proc.stdout.readline() if ready else ""
            except OSError:  # the helper is gone
                line = ""
            except BaseException:  # e.g. KeyboardInterrupt: its reply would answer the next request
                proc.kill()
                self._proc = None
                raise
            if not line.endswith("\n"):
                proc.kill()
                proc.wait()
                self._proc = None
                raise SandboxTimeout(f"{op}: no answer within {seconds + GRACE_SECONDS:.1f} s, helper killed")
            reply = json.loads(line)
            if reply.get("timeout"):
                raise SandboxTimeout(f"{op} interrupted after {seconds:.1f} s")
            return reply["result"]

    def close(self) -> None:
        """End the helper (it exits when its stdin closes)."""
        with self._lock:
            if self._proc is not None and self._owner == os.getpid():
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                self._proc = None


_HELPER = _Helper()
atexit.register(_HELPER.close)


def call(op: str, *args: Any, seconds: float) -> Any:
    """`op(*args)` in the helper ("math_equal" or "repair_json"); None if it raised; SandboxTimeout after `seconds`."""
    return _HELPER.call(op, list(args), seconds)
