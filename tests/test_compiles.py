"""Compilations: a GRPO run stops compiling after its first steps (counted, not timed), and command-line runs use
JAX's persistent compilation cache (where it goes, how it is overridden or turned off, and that it is written)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.runs import TINY_RUN, make_run_inputs
from vlmr1_jax import cli
from vlmr1_jax.cli.compile_cache import DEFAULT_DIR, cache_dir
from vlmr1_jax.config import load_config
from vlmr1_jax.train.loop import GRPOTrainer
from vlmr1_jax.train.metrics import read_metrics

STEPS, WARM_UP = 6, 2


@pytest.mark.slow
def test_grpo_steps_after_warm_up_compile_nothing(tmp_path):
    """Each step logs the process's compilation count: it grows in the first steps (sampler, reference
    log-probs, update) and then not at all; growth later would mean a program recompiled every step."""
    cfg = load_config(
        "demo_tiny",
        [
            *make_run_inputs(tmp_path),
            *TINY_RUN,
            f"train.max_steps={STEPS}",
            "train.save_every=1000",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    )
    GRPOTrainer.from_config(cfg, progress=False).train()
    counts = [r["compilations"] for r in read_metrics(tmp_path / "run")]
    assert len(counts) == STEPS
    assert counts[0] >= 3, counts  # the counter sees the first step's programs (sampler, reference, update)
    assert counts[WARM_UP:] == [counts[WARM_UP - 1]] * (STEPS - WARM_UP), counts


def test_cache_dir_precedence(tmp_path):
    flag, env, configured = (str(tmp_path / name) for name in ("flag", "env", "jax"))
    assert cache_dir(None, None, None) == DEFAULT_DIR.expanduser()
    assert cache_dir(None, None, configured) == tmp_path / "jax"  # JAX_COMPILATION_CACHE_DIR / a test set-up: kept
    assert cache_dir(None, env, configured) == tmp_path / "env"
    assert cache_dir(flag, env, configured) == tmp_path / "flag"
    assert cache_dir("off", env, configured) is None
    assert cache_dir(None, "OFF", configured) is None
    assert cache_dir(flag, "off", None) == tmp_path / "flag"  # the flag wins over the variable
    assert cache_dir("~/x", None, None) == Path("~/x").expanduser()


def test_every_command_line_run_sets_the_cache(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "enable_compilation_cache", seen.append)
    argv = ["reward", "format", "--completion", "<think>a</think><answer>b</answer>"]
    assert cli.main(argv) == 0 and seen == [None]
    assert cli.main(["--compilation-cache", "off", *argv]) == 0 and seen == [None, "off"]


def test_enabled_cache_is_written_and_off_writes_nothing(tmp_path):
    """In a fresh process (the cache is set up once per process): a compiled program lands in the directory."""
    script = textwrap.dedent(
        """
        import sys, jax, jax.numpy as jnp
        from vlmr1_jax.cli.compile_cache import enable_compilation_cache
        enable_compilation_cache(sys.argv[1])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
        """
    )
    for flag, directory in ((str(tmp_path / "cache"), tmp_path / "cache"), ("off", tmp_path / "off")):
        subprocess.run([sys.executable, "-c", script, flag], check=True, cwd=tmp_path)
        written = list(directory.glob("*")) if directory.exists() else []
        assert bool(written) == (flag != "off"), (flag, written)
