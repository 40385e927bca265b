"""JAX's persistent compilation cache for command-line runs: a second `vlmr1 train` (or a resume) of the same
shapes reads its compiled programs from disk instead of compiling them again.

Where: `--compilation-cache DIR`, else $VLMR1_COMPILATION_CACHE, else a directory JAX was already given
(JAX_COMPILATION_CACHE_DIR, a test set-up), else ~/.cache/vlmr1-jax/xla. `off` (flag or variable) disables it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

ENV_VAR = "VLMR1_COMPILATION_CACHE"
DEFAULT_DIR = Path("~/.cache/vlmr1-jax/xla")
OFF = "off"


def cache_dir(flag: str | None, env: str | None, configured: str | None) -> Path | None:
    """The cache directory a run uses (None: no persistent cache) from the flag, $VLMR1_COMPILATION_CACHE and the
    directory JAX already has, by the precedence above."""
    chosen = flag or env or configured or str(DEFAULT_DIR)
    return None if chosen.strip().lower() == OFF else Path(chosen).expanduser()


def enable_compilation_cache(flag: str | None) -> Path | None:
    """Point JAX's persistent compilation cache at the directory `cache_dir` picks (or turn it off); returns it."""
    configured = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]  # a flag jax does not declare
    directory = cache_dir(flag, os.environ.get(ENV_VAR), configured)
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    return directory
