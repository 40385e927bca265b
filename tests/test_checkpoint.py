"""Checkpointer: bit-exact TrainState round trips (nnx + optax MultiSteps/AdamW), other meshes, keep-K / interval,
exact grain resume, meta, and clear errors for mismatched or damaged checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import portpicker
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.helpers.files import flip_bytes
from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.data.pipeline import make_sample_iterator
from vlmr1_jax.rl.state import init_train_state
from vlmr1_jax.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    CorruptCheckpoint,
    abstract_like,
    fingerprints,
    read_meta,
)


class Tiny(nnx.Module):
    def __init__(self, seed: int):
        rngs = nnx.Rngs(seed)
        self.lm = nnx.Linear(8, 16, rngs=rngs)
        self.visual = nnx.Linear(16, 8, param_dtype=jnp.bfloat16, rngs=rngs)


def make_state(seed: int, updates: int = 0, with_reference: bool = True):
    """A TrainState (trainable lm, frozen bf16 visual) with `updates` optimizer updates of random gradients applied."""
    tx = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)), every_k_schedule=2)
    _, state = init_train_state(Tiny(seed), "freeze_vision", tx, with_reference)
    key = jax.random.key(seed)
    for i in range(updates):
        k = jax.random.fold_in(key, i)
        grads = jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape, x.dtype), state.trainable)
        upd, opt_state = tx.update(grads, state.opt_state, state.trainable)
        state = dataclasses.replace(
            state, step=state.step + 1, opt_state=opt_state, trainable=optax.apply_updates(state.trainable, upd)
        )
    return state


def host_leaves(tree) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(tree)]


def shard(state, mesh, spec_2d, spec_1d):
    def put(x):
        spec = spec_2d if x.ndim == 2 else spec_1d if x.ndim == 1 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(put, state)


def samples(n: int) -> list[Sample]:
    return [Sample(i, f"q{i}", f"a{i}", (), "default", "d.jsonl", i + 1) for i in range(n)]


def test_train_state_round_trips_bit_identical(tmp_path):
    state = make_state(0, updates=3)  # MultiSteps mid-accumulation: mini_step 1, non-zero Adam moments
    assert int(state.opt_state.mini_step) == 1
    expected = host_leaves(state)
    kernel, bias = (np.array(state.trainable["lm"][name][...]) for name in ("kernel", "bias"))
    meta = {"run": {"grpo": {"beta": 0.04, "reward_funcs": ["accuracy", "format"]}}, "tokenizer": "/t", "seed": 7}
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        assert ckpt.save(3, state, meta=meta)
        restored, got_meta = ckpt.restore(abstract_like(make_state(1)))  # a fresh state with other values
    assert got_meta == meta
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert isinstance(restored.trainable, nnx.State)
    assert isinstance(restored.opt_state, optax.MultiStepsState)
    got = host_leaves(restored)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    assert restored.frozen["visual"]["kernel"][...].dtype == jnp.bfloat16
    model = nnx.merge(nnx.graphdef(Tiny(9)), restored.trainable, restored.frozen)  # usable as a model again
    x = jnp.ones((2, 8))
    np.testing.assert_allclose(model.lm(x), np.ones((2, 8)) @ kernel + bias, rtol=1e-6)


def test_restore_onto_another_mesh_and_shardings(tmp_path):
    state = shard(make_state(0, updates=1), jax.make_mesh((2, 4), ("a", "b")), P("a", "b"), P("b"))
    assert state.trainable["lm"]["kernel"][...].sharding.spec == P("a", "b")
    expected = host_leaves(state)
    target = shard(make_state(2), jax.make_mesh((8,), ("x",)), P(None, "x"), P("x"))
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(1, state)
        restored, meta = ckpt.restore(abstract_like(target))
    assert meta == {}
    kernel = restored.trainable["lm"]["kernel"][...]
    assert kernel.sharding.mesh.axis_names == ("x",) and kernel.sharding.spec == P(None, "x")
    assert restored.frozen["visual"]["bias"][...].sharding.spec == P("x")
    for a, b in zip(host_leaves(restored), expected):
        assert a.tobytes() == b.tobytes()


def test_state_may_be_donated_right_after_an_async_save(tmp_path):
    state = {"w": jnp.arange(1 << 16, dtype=jnp.float32) + 1}
    expected = np.array(state["w"])
    overwrite = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 - 7, s), donate_argnums=0)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(1, state)
        state = jax.block_until_ready(overwrite(state))  # like the donated train step that follows a save
        restored, _ = ckpt.restore(abstract_like(state))
    assert np.array_equal(restored["w"], expected)


def test_save_every_keep_and_force(tmp_path):
    state = {"w": jnp.arange(4.0)}
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        saved = [ckpt.save(s, state) for s in range(1, 8)]
        assert saved == [False, True, False, True, False, True, False]
        assert ckpt.save(7, state, force=True)
        assert not ckpt.save(7, state, force=True)  # already saved
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [6, 7]
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:  # a resumed run sees the same steps
        assert ckpt.latest_step() == 7
        restored, _ = ckpt.restore(abstract_like(state), step=6)
        assert np.array_equal(restored["w"], np.arange(4.0))


def test_grain_iterator_resumes_exactly(tmp_path):
    make = lambda: make_sample_iterator(samples(10), batch_size=2, seed=3, num_epochs=2)
    reference = [s.id for s in make()]  # 20 samples over two shuffled epochs
    it = make()
    for _ in range(6):
        next(it)
    state = {"w": jnp.ones(3)}
    with Checkpointer(tmp_path, save_every=6, keep=1) as ckpt:
        assert ckpt.save(6, state, data_iterator=it)
        for _ in range(3):  # advancing right after an async save must not change what was saved
            next(it)
        fresh = make()
        ckpt.restore(abstract_like(state), data_iterator=fresh)
    assert [s.id for s in fresh] == reference[6:]


def test_read_meta_only(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=3) as ckpt:
        ckpt.save(1, {"w": jnp.zeros(2)}, meta={"model": {"preset": "tiny"}, "step": 1})
        ckpt.save(2, {"w": jnp.zeros(2)}, meta={"model": {"preset": "tiny"}, "step": 2})
    assert read_meta(tmp_path) == {"model": {"preset": "tiny"}, "step": 2}
    assert read_meta(tmp_path, step=1)["step"] == 1
    with pytest.raises(FileNotFoundError, match="step 5"):
        read_meta(tmp_path, step=5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_meta(tmp_path / "nope")


def test_meta_must_be_json(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt, pytest.raises(ValueError, match="JSON"):
        ckpt.save(1, {"w": jnp.zeros(2)}, meta={"bad": object()})


def test_mismatched_state_names_the_leaf(tmp_path):
    state = make_state(0)
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(1, state)
        target = abstract_like(state)
        kernel = target.trainable["lm"]["kernel"]
        wrong_dtype = jax.tree.map(lambda x: x, target)
        wrong_dtype.trainable["lm"]["kernel"].set_value(
            jax.ShapeDtypeStruct(kernel.shape, jnp.bfloat16, sharding=kernel.sharding)
        )
        with pytest.raises(
            CheckpointError,
            match=r"trainable\.lm\.kernel\.value: checkpoint has float32\[8,16\], "
            r"expected bfloat16\[8,16\]",
        ):
            ckpt.restore(wrong_dtype)
        wrong_shape = jax.tree.map(lambda x: x, target)
        wrong_shape.trainable["lm"]["bias"].set_value(jax.ShapeDtypeStruct((17,), jnp.float32))
        with pytest.raises(CheckpointError, match=r"trainable\.lm\.bias\.value: checkpoint has float32\[16\]"):
            ckpt.restore(wrong_shape)
        no_reference = dataclasses.replace(target, reference=None)
        with pytest.raises(CheckpointError, match=r"reference\.lm\.kernel\.value: in the checkpoint"):
            ckpt.restore(no_reference)
        with pytest.raises(CheckpointError, match="without a data iterator"):
            ckpt.restore(target, data_iterator=make_sample_iterator(samples(4), 2, seed=0))
    with Checkpointer(tmp_path / "other", save_every=1, keep=1) as ckpt:
        ckpt.save(1, make_state(0, with_reference=False))
        with pytest.raises(CheckpointError, match=r"reference\.lm\.kernel\.value: expected float32\[8,16\], missing"):
            ckpt.restore(target)
        with pytest.raises(FileNotFoundError, match="step 9"):
            ckpt.restore(target, step=9)
    with (
        Checkpointer(tmp_path / "empty", save_every=1, keep=1) as ckpt,
        pytest.raises(FileNotFoundError, match="no checkpoint"),
    ):
        ckpt.restore(target)


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    state = {"w": jnp.arange(64.0)}
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        ckpt.save(1, state, meta={"a": 1})
        ckpt.save(2, state, meta={"a": 2})
        ckpt.wait()
        arrays = tmp_path / "1" / "state"
        for f in [*arrays.glob("ocdbt.process_*/**/*"), *arrays.glob("d/*")]:
            if f.is_file():
                f.write_bytes(b"garbage")
        with pytest.raises(CheckpointError, match=r"cannot read .*checkpoint .*/1: "):
            ckpt.restore(abstract_like(state), step=1)
        shutil.rmtree(tmp_path / "2" / "state")
        with pytest.raises(CheckpointError, match=r"checkpoint .*/2 has no training state"):
            ckpt.restore(abstract_like(state), step=2)
    (tmp_path / "2" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta of checkpoint"):
        read_meta(tmp_path, step=2)
    assert json.loads((tmp_path / "1" / "meta" / "metadata").read_text())["a"] == 1


def test_flipped_bytes_in_an_array_file_are_caught(tmp_path):
    """Orbax reads the flipped file without complaint; the fingerprints saved in the meta catch it."""
    rng = np.random.default_rng(0)
    state = {"w": jnp.asarray(rng.normal(size=(256, 256)).astype(np.float32)), "b": jnp.zeros(3)}
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        ckpt.save(1, state, meta={"a": 1})
        ckpt.wait()
        largest = max((p for p in (tmp_path / "1" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        flip_bytes(largest)
        with pytest.raises(CorruptCheckpoint, match=r"checkpoint .*/1 is corrupted: the arrays w differ"):
            ckpt.restore(abstract_like(state))
        moved = ckpt.quarantine(1)
        assert moved.is_dir() and moved.name.startswith("1.corrupt-") and ckpt.all_steps() == []


def test_fingerprints_see_any_changed_or_moved_word():
    base = np.arange(1000, dtype=np.float32)
    reference = fingerprints({"x": jnp.asarray(base)})["x"]
    changed, swapped, key = base.copy(), base.copy(), jax.random.key(3)
    changed[500] = np.nextafter(changed[500], np.float32(1e9))  # one bit
    swapped[[10, 20]] = swapped[[20, 10]]  # same sum, other positions
    assert fingerprints({"x": jnp.asarray(changed)})["x"] != reference
    assert fingerprints({"x": jnp.asarray(swapped)})["x"] != reference
    assert fingerprints({"x": jnp.asarray(base)})["x"] == reference
    assert fingerprints({"k": key}) == fingerprints({"k": jax.random.key(3)}) != fingerprints({"k": jax.random.key(4)})
    assert set(
        fingerprints(
            {"h": jnp.ones(4, jnp.bfloat16), "i": jnp.ones(2, jnp.int64 if jax.config.x64_enabled else jnp.int32)}
        )
    ) == {"h", "i"}


# Run in 2 processes x 4 CPU devices (docs/facts.md: Multi-host on CPU): argv = process id, port, folder, save|restore.
WORKER = """
import sys
pid, port, folder, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
import jax
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tests.helpers.files import flip_bytes
from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.data.pipeline import make_sample_iterator
from vlmr1_jax.train.checkpoint import Checkpointer, abstract_like
samples = [Sample(i, "q", "a", (), "default", "d.jsonl", i + 1) for i in range(16)]
make = lambda: make_sample_iterator(samples, 4, seed=1, process_index=pid, process_count=2)
reference = [next(it).id for it in [make()] for _ in range(6)]
full = np.arange(128, dtype=np.float32).reshape(8, 16)
if mode == "save":
    sharding = NamedSharding(jax.make_mesh((2, 2, 2), ("d", "f", "t")), P("f", "t"))
    state = {"x": jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])}
    it = make()
    next(it), next(it)  # this process's 2 samples of the first global batch of 4
    with Checkpointer(folder, save_every=1, keep=1) as ckpt:
        assert ckpt.save(1, state, data_iterator=it, meta={"processes": 2})
    print("save ok")
else:
    sharding = NamedSharding(jax.make_mesh((8,), ("f",)), P(None, "f"))
    it = make()
    with Checkpointer(folder, save_every=1, keep=1) as ckpt:
        state, meta = ckpt.restore({"x": jax.ShapeDtypeStruct(full.shape, np.float32, sharding=sharding)}, it)
    values = np.asarray(multihost_utils.process_allgather(state["x"], tiled=True))
    assert state["x"].sharding.spec == P(None, "f") and meta == {"processes": 2}
    assert np.array_equal(values, full), values
    assert [next(it).id for _ in range(4)] == reference[2:], "data iterator did not resume"
    print("restore ok")
jax.distributed.shutdown()
"""


def test_two_processes_save_and_restore_on_another_mesh(tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for mode in ("save", "restore"):
        port = str(portpicker.pick_unused_port())
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, str(pid), port, str(tmp_path), mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for pid in (0, 1)
        ]
        try:
            for proc in procs:
                out, _ = proc.communicate(timeout=120)
                assert proc.returncode == 0 and out.strip().endswith(f"{mode} ok"), out[-3000:]
        finally:
            for proc in procs:  # a failed peer must not leave the other one waiting
                if proc.poll() is None:
                    proc.kill()
    assert sorted(p.name for p in (tmp_path / "1" / "data").glob("*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
