"""Shared test set-up: 8 simulated CPU devices, a persistent compile cache, tiny random HF checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # a stray torch-npu must not break `import torch`
# Tests run tiny programs: XLA's backend optimisations cost more compile time than they save (cold suite 2x faster).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", str(Path(__file__).resolve().parent.parent / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

sys.path.insert(0, str(Path(__file__).parent))
from hf_models import TINY_CONFIG, TINY_CONFIG_B, save_random_hf_model  # noqa: E402 -- after jax is configured above


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """Tiny untied Qwen2.5-VL (covers windowed + full blocks, padded windows, GQA, sectioned M-RoPE), every
    parameter random, saved by transformers."""
    return save_random_hf_model(tmp_path_factory.mktemp("tiny_untied"), TINY_CONFIG, seed=0, tied=False)


@pytest.fixture(scope="session")
def tiny_hf_tied_dir(tmp_path_factory) -> Path:
    return save_random_hf_model(tmp_path_factory.mktemp("tiny_tied"), TINY_CONFIG, seed=1, tied=True)


@pytest.fixture(scope="session")
def tiny_hf_b_dir(tmp_path_factory) -> Path:
    """A second tiny shape: other depths, heads, GQA ratio, windows and full-attention blocks; tied head."""
    return save_random_hf_model(tmp_path_factory.mktemp("tiny_b"), TINY_CONFIG_B, seed=2)
