"""A full disk while a checkpoint is written: one `error:` line naming the folder, the cause and the fix, not the
hundreds of tracebacks orbax's writer threads print. The disk is simulated with RLIMIT_FSIZE (writes past the
limit fail with EFBIG, through the same tensorstore path as ENOSPC)."""

from __future__ import annotations

import io
import resource
import signal
import subprocess
import sys
import threading

import pytest

from tests.helpers.runs import TINY_RUN, make_run_inputs
from vlmr1_jax.quiet import TracebackFilter

TRACEBACK = (
    'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\nRuntimeError: Event loop is closed\n'
)


def test_filter_drops_interleaved_thread_tracebacks_and_keeps_the_rest():
    out = io.StringIO()
    stream = TracebackFilter(out)

    def noisy():
        for _ in range(50):
            for piece in TRACEBACK.split(" "):  # printed in fragments, as C code does
                stream.write(piece if piece.endswith("\n") else piece + " ")

    threads = [threading.Thread(target=noisy) for _ in range(4)]
    for t in threads:
        t.start()
    stream.write("progress 1/3\r")
    stream.write("keep this line\n")
    for t in threads:
        t.join()
    stream.flush()
    assert stream.dropped == 200
    assert out.getvalue() == "progress 1/3\rkeep this line\n"


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_full_disk_is_one_error_line(tmp_path):
    inputs = make_run_inputs(tmp_path)
    command = [
        sys.executable,
        "-m",
        "vlmr1_jax.cli",
        "train",
        "demo_tiny",
        *inputs,
        *TINY_RUN,
        "train.max_steps=3",
        "train.save_every=2",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=_limit_file_size(300_000), timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip() and "it/s" not in line and "s/it" not in line]
    assert "Traceback" not in done.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: [Errno 27] cannot write a checkpoint in "), lines
    assert "File too large" in errors[0] and "train.output_dir" in errors[0]
    assert len(lines) <= 4, lines
