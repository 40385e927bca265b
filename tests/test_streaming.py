"""Streaming conversion: `vlmr1 import-hf` and `vlmr1 export` hold a few tensors on the host, never the model.

The memory test converts a 350 MB (fp32) random model of 5 shards in child processes and bounds each one's peak RSS
(VmHWM) by its RSS after imports + K x the largest tensor + a small constant (scripts/test_scale.py, which runs the
same steps on a full-size 3B). Correctness is checked against the source files and numpy conversions of them;
the import checkpoint's checksums catch a corrupted file; a training run starts from an import checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from tests.helpers.cli import run_cli
from tests.helpers.hf_models import TINY_CONFIG
from tests.helpers.params import assert_same_params, host_params
from tests.helpers.release import CORPUS, compact_config, make_release_source
from vlmr1_jax.filenames import CHECKSUMS_FILE
from vlmr1_jax.models.hf_weights import iter_hf_tensors, load_hf_model, stored_tensors
from vlmr1_jax.models.qwen2_5_vl.config import from_hf_config
from vlmr1_jax.processing.tokenizer import build_compact_tokenizer
from vlmr1_jax.train.checkpoint import CheckpointError
from vlmr1_jax.train.restore import PARAMS, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("scale_script", ROOT / "scripts" / "test_scale.py")
scale = sys.modules.setdefault("scale_script", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(scale)

# Allocator arenas and thread pools beyond the tensors: measured at 5-10 MiB with the compact tokenizer.
SLACK = 32 * 2**20
MiB = 2**20


def streaming_config(tokenizer) -> dict:
    """16 decoder layers of width 640 and 8 vision blocks: 87M parameters, none larger than 1.3M."""
    base = copy.deepcopy(TINY_CONFIG)
    base.update(
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=16,
        num_attention_heads=10,
        num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
    )
    base["vision_config"].update(
        depth=8, hidden_size=256, intermediate_size=768, num_heads=4, out_hidden_size=640, fullatt_block_indexes=[3, 7]
    )
    return compact_config(tokenizer, base)


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """A random bf16 HF checkpoint of `streaming_config` in 5 shards (176 MB), with its tokenizer."""
    tokenizer = build_compact_tokenizer(CORPUS, vocab_size=300)
    cfg = from_hf_config(streaming_config(tokenizer))
    folder = scale.random_hf_checkpoint(
        cfg, tmp_path_factory.mktemp("big") / "source", dtype="bf16", max_shard_size="40MB", seed=5
    )
    tokenizer.save(folder)
    return folder, cfg


def measured(argv: list, allowed: int, model_bytes: int):
    """Run `vlmr1 ARGV` in a child process; its growth over its own post-import RSS must stay within `allowed`."""
    assert allowed < model_bytes / 4, "the bound must be far below the model, or the test proves nothing"
    m = scale.run_measured(argv, timeout=600)
    assert m.returncode == 0, m.output[-3000:]
    assert m.growth <= allowed, (
        f"vlmr1 {argv[0]}: peak RSS grew {m.growth / MiB:.1f} MiB over its baseline "
        f"{m.baseline / MiB:.0f} MiB; allowed {allowed / MiB:.1f} MiB (the model is "
        f"{model_bytes / MiB:.0f} MiB)"
    )
    return m


@pytest.mark.slow
def test_conversions_hold_a_few_tensors_not_the_model(big_source, tmp_path):
    source, cfg = big_source
    shards = sorted(source.glob("*.safetensors"))
    assert len(shards) >= 4
    n_params = sum(int(np.prod(t.shape)) for t in stored_tensors(source).values())
    assert n_params > 85_000_000
    # K tensors as wide as the conversion's wider dtype (as read, as cast, the finiteness mask: <= 2.25x).
    fp32_bound = scale.bound(cfg, 4, SLACK)  # about 48 MiB; the fp32 model is 350 MB
    fp16_bound = scale.bound(cfg, 2, SLACK)
    imported, release, back = tmp_path / "imported", tmp_path / "release", tmp_path / "back"

    measured(["import-hf", "--model", source, "--out", imported], fp32_bound, 4 * n_params)
    measured(["export", source, "--out", release, "--target", "ascend-310p"], fp16_bound, 2 * n_params)
    measured(["export", imported, "--out", back, "--dtype", "fp32"], fp32_bound, 4 * n_params)

    # Every tensor: 310P = numpy's bf16 -> fp16; the import and its fp32 export = the exact fp32 of the source.
    params = dict(iter_hf_tensors(imported / "checkpoints" / "0" / PARAMS))
    duo, exported = dict(iter_hf_tensors(release)), dict(iter_hf_tensors(back))
    for name, value in iter_hf_tensors(source):
        assert value.dtype == ml_dtypes.bfloat16
        half = value.astype(np.float32).astype(np.float16)
        assert duo[name].dtype == np.float16 and np.array_equal(duo[name], half), name
        assert params[name].dtype == np.float32 and np.array_equal(params[name], value.astype(np.float32)), name
        assert exported[name].tobytes() == params[name].tobytes(), name
    assert duo.keys() == params.keys() == exported.keys()


def test_import_export_round_trip_and_bf16_to_fp16(release_source, tmp_path, capsys):
    """Tiny transformers-written fp32 source: import -> export is bit-identical; imported in bf16 and exported
    to fp16, every tensor equals numpy's fp32 -> bf16 -> fp16."""
    assert run_cli("import-hf", "--model", release_source, "--out", tmp_path / "fp32") == 0
    params = tmp_path / "fp32" / "checkpoints" / "0" / PARAMS
    manifest = json.loads((params / CHECKSUMS_FILE).read_text())["tensors"]
    expected = dict(iter_hf_tensors(release_source))
    assert manifest.keys() == expected.keys() and {m["dtype"] for m in manifest.values()} == {"F32"}
    assert run_cli("export", tmp_path / "fp32", "--out", tmp_path / "release", "--dtype", "fp32") == 0
    written = dict(iter_hf_tensors(tmp_path / "release"))
    assert written.keys() == expected.keys()
    for name, value in expected.items():
        assert written[name].dtype == np.float32 and written[name].tobytes() == value.tobytes(), name

    assert run_cli("import-hf", "--model", release_source, "--out", tmp_path / "bf16", "--param-dtype", "bfloat16") == 0
    assert run_cli("export", tmp_path / "bf16", "--out", tmp_path / "duo", "--target", "ascend-310p") == 0
    duo = dict(iter_hf_tensors(tmp_path / "duo"))
    for name, value in expected.items():
        reference = value.astype(ml_dtypes.bfloat16).astype(np.float32).astype(np.float16)
        assert duo[name].dtype == np.float16 and np.array_equal(duo[name], reference), name
    capsys.readouterr()


def test_import_checkpoint_loads_and_catches_corruption(release_source, tmp_path, capsys):
    out = tmp_path / "imported"
    assert run_cli("import-hf", "--model", release_source, "--out", out) == 0
    model, meta, tokenizer_dir = load_checkpoint(out)
    assert_same_params(model, load_hf_model(release_source))
    assert (meta["kind"], tokenizer_dir) == ("import", str(release_source))
    assert not (out / "checkpoints" / "0" / "state").exists()  # parameters only: no optimizer state on disk

    shard = next((out / "checkpoints" / "0" / PARAMS).glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40  # one bit of the last tensor
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{shard.name}: tensor .* does not match its checksum"):
        load_checkpoint(out)
    assert run_cli("export", out, "--out", tmp_path / "release") == 1
    assert "does not match its checksum" in capsys.readouterr().err and not (tmp_path / "release").exists()
    (out / "checkpoints" / "0" / PARAMS / CHECKSUMS_FILE).unlink()
    with pytest.raises(CheckpointError, match=CHECKSUMS_FILE):
        load_checkpoint(out)


def test_broken_safetensors_header_is_named(release_source, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in release_source.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:8] + b"{not json" + weights.read_bytes()[17:])
    assert run_cli("import-hf", "--model", broken, "--out", tmp_path / "a") == 1
    assert f"{weights}: header is not JSON" in capsys.readouterr().err
    assert run_cli("export", broken, "--out", tmp_path / "b") == 1
    assert f"{weights}: header is not JSON" in capsys.readouterr().err
    weights.write_bytes((release_source / "model.safetensors").read_bytes()[:-100])  # truncated data
    assert run_cli("export", broken, "--out", tmp_path / "b") == 1
    assert re.search(rf"{re.escape(str(weights))}: tensor .* \(truncated\?\)", capsys.readouterr().err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_training_starts_from_an_import_checkpoint(release_source, tmp_path):
    """A run folder holding only an import checkpoint: the trainer takes its parameters (not model.hf_model's),
    creates a fresh optimizer state, trains, saves, and a restart resumes from its own checkpoint."""
    from vlmr1_jax.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from vlmr1_jax.data.synthetic import generate, image_folder
    from vlmr1_jax.train.sft import SFTTrainer

    other = make_release_source(tmp_path / "other", seed=21)  # same tokenizer, other weights
    run_dir = tmp_path / "run"
    assert run_cli("import-hf", "--model", other, "--out", run_dir) == 0
    data = generate(str(tmp_path / "synth"), n=8, seed=0)
    cfg = RunConfig(
        model=ModelConfig(hf_model=str(release_source)),
        data=DataConfig(data_file_paths=data, image_folders=image_folder(str(tmp_path / "synth")), prompts_per_step=2),
        train=TrainConfig(output_dir=str(run_dir), max_steps=1, save_every=1, keep_checkpoints=3),
    )
    trainer = SFTTrainer.from_config(cfg, progress=False)
    assert trainer.step == 0 and int(trainer.state.step) == 0
    assert_same_params(trainer.model(), load_hf_model(other))
    moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim > 0]
    assert moments and all(not np.any(np.asarray(x)) for x in moments)  # fresh Adam moments
    trained = trainer.train()
    assert np.isfinite(trained["loss"])
    after = host_params(trainer.model())

    again = SFTTrainer.from_config(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=2)), progress=False
    )
    assert again.step == 1
    restored = host_params(again.model())
    assert all(np.array_equal(after[k], restored[k]) for k in after)
    again.close()
