"""Running `vlmr1 train` in worker processes for the end-to-end trainer tests (two processes, kill and resume):
a tiny synthetic REC data set with a compact tokenizer, the command line, a child environment, and readers for
what a run leaves behind (summary line, metrics, rollouts, checkpointed arrays)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vlmr1_jax.data.synthetic import corpus_strings, generate, image_folder
from vlmr1_jax.processing.tokenizer import build_compact_tokenizer

ROOT = Path(__file__).resolve().parents[2]

# demo_tiny, shrunk to seconds per step: 4 new tokens, and the length reward so that random completions get
# different rewards (non-zero advantages, a real update); rec_format keeps the REC columns in use.
TINY_RUN = (
    "sampling.max_new_tokens=4",
    "grpo.reward_funcs=[length,rec_format]",
    "data.prompts_per_step=2",
    "grpo.num_generations=4",
    "train.rollout_log=true",
    "train.log_every=1",
)
NOT_REPRODUCIBLE = ("time/", "tokens_per_second", "compilations")  # they measure the machine or process, not the run


def make_run_inputs(folder: Path) -> list[str]:
    """16 synthetic REC samples and a 320-token compact tokenizer in `folder`; the overrides that use them."""
    data = generate(str(folder / "synth"), n=16, seed=0)
    tokenizer = folder / "tokenizer"
    build_compact_tokenizer(corpus_strings(), vocab_size=320).save(tokenizer)
    return [
        f"data.data_file_paths={data}",
        f"data.image_folders={image_folder(str(folder / 'synth'))}",
        f"model.tokenizer={tokenizer}",
    ]


def worker_env(num_devices: int, **extra: str) -> dict[str, str]:
    """The child's environment: its own CPU device count (conftest's 8 apply to pytest only), the repository on
    the path, and the persistent compile cache shared with the test session."""
    return {
        **os.environ,
        "JAX_NUM_CPU_DEVICES": str(num_devices),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
        "TORCH_DEVICE_BACKEND_AUTOLOAD": "0",
        **extra,
    }


def start_training(overrides: list[str], log_stem: Path, env: dict[str, str]) -> subprocess.Popen:
    """`vlmr1 train demo_tiny <overrides>` in a child process; stdout / stderr go to `<log_stem>.out` / `.err`
    (files, not pipes: orbax logs enough to fill a pipe and stall a peer that is waiting in a collective)."""
    with open(f"{log_stem}.out", "w") as out, open(f"{log_stem}.err", "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "vlmr1_jax.cli", "train", "demo_tiny", *overrides, "--no-progress"],
            env=env,
            cwd=log_stem.parent,
            stdout=out,
            stderr=err,
            text=True,
        )


def wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for every process; on a timeout or an exception kill those still running (a hung peer must not stall)."""
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def log_tail(log_stem: Path, chars: int = 4000) -> str:
    """The ends of a child's stdout and stderr, for an assertion message."""
    return "\n".join(Path(f"{log_stem}.{kind}").read_text()[-chars:] for kind in ("out", "err"))


def reproducible(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics record without its timings."""
    return {k: v for k, v in record.items() if not k.startswith(NOT_REPRODUCIBLE)}


def summary(log_stem: Path) -> dict[str, str]:
    """The `name=value ...` line `vlmr1 train` prints last, values as printed (4 significant digits)."""
    line = Path(f"{log_stem}.out").read_text().strip().splitlines()[-1]
    return dict(item.split("=", 1) for item in line.split())


def jsonl(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSONL log, in file order (a resumed run's repeated steps included)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_state(state_dir: Path) -> dict[str, np.ndarray]:
    """Every array of a checkpointed TrainState as numpy, by key path, read straight from the orbax files."""
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}
