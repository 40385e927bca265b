"""Shared test set-up: 8 simulated CPU devices, a persistent compile cache, the session's tiny random HF folders."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # a stray torch-npu must not break `import torch`
# Tests run tiny programs: XLA's backend optimisations cost more compile time than they save (cold suite 2x faster),
# and XLA:CPU's loop emitters compile them faster than its fusion emitters (the tiny GRPO step: 3.5 s instead of 12 s).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
).strip()

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", str(Path(__file__).resolve().parent.parent / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


from tests.helpers.files import read_only  # noqa: E402
from tests.helpers.hf_models import TINY_CONFIG, TINY_CONFIG_B, save_random_hf_model  # noqa: E402
from tests.helpers.release import make_release_source  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """`make test` hands out whole files to its xdist workers (`--dist loadfile`), by default those with the most
    tests first: the end-to-end files, one or two long tests each, came last and one worker waited for the other
    (over a minute). The workers take the files in collection order instead, which the hook below sets."""
    if hasattr(config.option, "loadscopereorder"):  # absent under -p no:xdist
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with a `slow` test first, then the others, each group with the most tests per file first; a file's tests
    stay together and in their order."""
    tests_in = Counter(item.path for item in items)
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path not in slow, -tests_in[item.path]))


# The session folders below are built once per session (per xdist worker) and shared by every module that asks; a
# test that wrote into one would change what the next test sees, so each fails the session if it changed: copy first.


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Iterator[Path]:
    """Tiny untied Qwen2.5-VL (covers windowed + full blocks, padded windows, GQA, sectioned M-RoPE), every
    parameter random, saved by transformers."""
    with read_only(
        save_random_hf_model(tmp_path_factory.mktemp("tiny_untied"), TINY_CONFIG, seed=0, tied=False)
    ) as folder:
        yield folder


@pytest.fixture(scope="session")
def tiny_hf_tied_dir(tmp_path_factory) -> Iterator[Path]:
    with read_only(
        save_random_hf_model(tmp_path_factory.mktemp("tiny_tied"), TINY_CONFIG, seed=1, tied=True)
    ) as folder:
        yield folder


@pytest.fixture(scope="session")
def tiny_hf_b_dir(tmp_path_factory) -> Iterator[Path]:
    """A second tiny shape: other depths, heads, GQA ratio, windows and full-attention blocks; tied head."""
    with read_only(save_random_hf_model(tmp_path_factory.mktemp("tiny_b"), TINY_CONFIG_B, seed=2)) as folder:
        yield folder


@pytest.fixture(scope="session")
def release_source(tmp_path_factory) -> Iterator[Path]:
    """A tiny HF source whose model, compact tokenizer and processor agree (TINY_CONFIG shapes, untied): what the
    export, deploy, runtime, restore and evaluation tests export from."""
    with read_only(make_release_source(tmp_path_factory.mktemp("release_source") / "source", seed=13)) as folder:
        yield folder


@pytest.fixture(scope="session")
def fp32_release(release_source, tmp_path_factory) -> Iterator[Path]:
    """`release_source` exported as an fp32 HF release (our export), for the torch runtime and evaluation tests."""
    from converters.release import export_release
    from vlmr1_jax.models.hf_weights import load_hf_model

    model = load_hf_model(release_source)
    out = export_release(
        model,
        model.cfg,
        tmp_path_factory.mktemp("fp32_release") / "release",
        dtype="fp32",
        tokenizer_dir=release_source,
    )
    with read_only(out) as folder:
        yield folder
