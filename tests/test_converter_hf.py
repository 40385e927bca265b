"""HF safetensors <-> our parameter tree (`converters.hf`): byte-exact round trip, name schemes, shards, errors, bf16.

The reference files are written by transformers' own `save_pretrained` (conftest fixtures), so names, layouts and
dtypes are checked against what HF produces, not against our writer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from converters.hf import save_hf_safetensors
from tests.helpers.params import assert_same_params, host_params
from vlmr1_jax.filenames import INDEX_FILE
from vlmr1_jax.models.hf_weights import load_hf_model
from vlmr1_jax.models.qwen2_5_vl.params import from_hf_tensor, hf_entries

SINGLE = "model.safetensors"


def rewrite(src: Path, dst: Path, edit: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Path:
    """Copy an HF folder (config.json + one safetensors file) with its tensors passed through `edit`."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(edit(load_file(src / SINGLE)), str(dst / SINGLE), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def untied(tiny_hf_dir):
    return load_hf_model(tiny_hf_dir)


@pytest.fixture(scope="module")
def sharded_dir(tiny_hf_dir, tmp_path_factory) -> Path:
    """The untied tiny model re-saved by transformers in several shards with an index."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = tmp_path_factory.mktemp("sharded")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="40KB")
    return out


@pytest.mark.parametrize("fixture", ["tiny_hf_dir", "tiny_hf_tied_dir"])
def test_round_trip_is_byte_identical(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    model = load_hf_model(src)
    out = tmp_path / SINGLE
    save_hf_safetensors(nnx.state(model), model.cfg, out)
    with safe_open(src / SINGLE, framework="numpy") as a, safe_open(out, framework="numpy") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert b.metadata() == {"format": "pt"}
        for name in a.keys():  # noqa: SIM118 -- safe_open has keys() but is not iterable
            x, y = a.get_tensor(name), b.get_tensor(name)
            assert (x.dtype, x.shape) == (y.dtype, y.shape), name
            assert x.tobytes() == y.tobytes(), name
        assert len(a.keys()) == (80 if model.cfg.text.tie_word_embeddings else 81)  # docs/facts.md: Checkpoint layout
        assert ("lm_head.weight" in b.keys()) == (not model.cfg.text.tie_word_embeddings)  # noqa: SIM118 -- safe_open has keys() but is not iterable


def test_sharded_folder_loads_identically(sharded_dir, untied):
    index = json.loads((sharded_dir / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1, "the fixture must really be sharded"
    assert not (sharded_dir / SINGLE).exists()
    assert_same_params(load_hf_model(sharded_dir), untied)


def test_transformers_5_in_memory_names_are_accepted(tiny_hf_dir, tmp_path, untied):
    def rename(t):
        new = {}
        for k, v in t.items():
            if k.startswith("visual."):
                k = "model." + k
            elif k.startswith("model."):
                k = "model.language_model." + k[len("model.") :]
            new[k] = v
        assert any(k.startswith("model.language_model.layers.") for k in new) and "lm_head.weight" in new
        return new

    assert_same_params(load_hf_model(rewrite(tiny_hf_dir, tmp_path, rename)), untied)


def test_tied_checkpoint_with_a_stored_lm_head_loads(tiny_hf_tied_dir, tmp_path):
    def add_head(t):
        return {**t, "lm_head.weight": t["model.embed_tokens.weight"]}

    assert_same_params(load_hf_model(rewrite(tiny_hf_tied_dir, tmp_path, add_head)), load_hf_model(tiny_hf_tied_dir))


@pytest.mark.parametrize(
    "name", ["model.layers.1.mlp.up_proj.weight", "lm_head.weight", "visual.patch_embed.proj.weight"]
)
def test_missing_tensor_is_named(tiny_hf_dir, tmp_path, name):
    src = rewrite(tiny_hf_dir, tmp_path, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(KeyError, match=rf"missing tensors .*{re.escape(name)}"):
        load_hf_model(src)


def test_unexpected_tensor_is_named(tiny_hf_dir, tmp_path):
    name = "model.layers.0.self_attn.rotary.weight"
    src = rewrite(tiny_hf_dir, tmp_path, lambda t: {**t, name: np.zeros((2,), np.float32)})
    with pytest.raises(KeyError, match=rf"unexpected tensor '{re.escape(name)}'"):
        load_hf_model(src)


@pytest.mark.parametrize(
    "name, shape", [("visual.blocks.0.attn.qkv.bias", (95,)), ("model.layers.1.self_attn.k_proj.weight", (64, 64))]
)
def test_wrong_shape_is_named(tiny_hf_dir, tmp_path, name, shape):
    src = rewrite(tiny_hf_dir, tmp_path, lambda t: {**t, name: np.zeros(shape, np.float32)})
    with pytest.raises(ValueError, match=rf"tensor '{re.escape(name)}' has shape {re.escape(str(shape))}"):
        load_hf_model(src)


def test_missing_shard_is_named(sharded_dir, tmp_path):
    copy = Path(shutil.copytree(sharded_dir, tmp_path / "m"))
    shard = sorted(set(json.loads((copy / INDEX_FILE).read_text())["weight_map"].values()))[-1]
    (copy / shard).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(shard)):
        load_hf_model(copy)


def test_missing_config_is_named(tiny_hf_dir, tmp_path):
    shutil.copy(tiny_hf_dir / SINGLE, tmp_path / SINGLE)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf_model(tmp_path)


def test_missing_weights_are_reported(tiny_hf_dir, tmp_path):
    shutil.copy(tiny_hf_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=re.escape(SINGLE)):
        load_hf_model(tmp_path)


@pytest.mark.parametrize("param_dtype", [np.float32, ml_dtypes.bfloat16])
def test_bf16_checkpoint_loads_rounded_values(tiny_hf_dir, tmp_path, param_dtype):
    src = rewrite(tiny_hf_dir, tmp_path, lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
    with safe_open(src / SINGLE, framework="numpy") as f:
        assert f.get_tensor("model.norm.weight").dtype == ml_dtypes.bfloat16
    fp32 = load_file(tiny_hf_dir / SINGLE)
    model = load_hf_model(src, param_dtype=param_dtype)
    loaded = host_params(model)
    entries = hf_entries(nnx.state(model))
    rounded = 0
    for name, path, layer, _ in entries:
        value = loaded[path] if layer is None else loaded[path][layer]
        exact = from_hf_tensor(path, fp32[name])
        assert value.dtype == param_dtype, name
        np.testing.assert_array_equal(
            value.astype(np.float32), exact.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=name
        )
        rounded += int((value.astype(np.float32) != exact).any())
    assert rounded == len(entries) == len(fp32)  # random fp32 values: every tensor really went through bf16


def test_written_safetensors_get_the_usual_permissions(tiny_hf_dir, tmp_path):
    """safetensors creates files 0600 whatever the umask; ours get 0666 & ~umask like every other file we write."""
    model = load_hf_model(tiny_hf_dir)
    path = tmp_path / "model.safetensors"
    save_hf_safetensors(nnx.state(model), model.cfg, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
