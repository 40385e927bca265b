"""Training checkpoints: the whole `TrainState` pytree, the grain iterator position and a JSON `meta`, via orbax.

Layout (orbax `CheckpointManager`, one folder per step): `<dir>/<step>/state` (OCDBT arrays of the TrainState:
params, optimizer state, step, reference), `<dir>/<step>/data/process_<i>-of-<n>.json` (grain iterator state, one file
per process) and `<dir>/<step>/meta/metadata` (JSON: run config, model config, tokenizer path, seed...).

Orbax writes each step into a temporary folder and renames it when every item is written, so a crash leaves no
half checkpoint behind. nnx.State, nnx Variables and optax states (named tuples, MultiSteps) are ordinary pytrees
and are saved as they are; leaves are named by their key path (e.g. `opt_state.inner_opt_state.1.0.mu.a.kernel.value`).
Restores are checked leaf by leaf against the expected abstract state before any array is read (orbax would
silently cast a dtype), and again afterwards (shape, dtype, sharding). The meta carries a fingerprint of every leaf
(two wrapping sums of its bits, computed on the devices at save time); a restore recomputes them and raises
`CorruptCheckpoint` on any difference, so flipped bytes in an array file are caught instead of trained on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

STATE, DATA, META = "state", "data", "meta"
FINGERPRINTS = "fingerprints"  # meta key: leaf name -> [sum of bits, position-weighted sum of bits], both mod 2**32
_MAX_LISTED = 10  # problems listed in one mismatch error
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the state it is restored into."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read or whose arrays differ from the fingerprints saved with them."""


def _leaf_bits(x: jax.Array) -> jax.Array:
    """The raw bits of a leaf as uint32 of the leaf's shape (a trailing axis of 2 for 8-byte types; typed PRNG keys
    as their key data). No reshape, so the leaf keeps its sharding under explicit mesh axes."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _fingerprint_arrays(leaves: list[jax.Array]) -> list[jax.Array]:
    def one(x: jax.Array) -> jax.Array:
        bits = _leaf_bits(x)
        sharding = jax.typeof(bits).sharding
        weights, stride = jnp.ones((), jnp.uint32), 1
        for axis in reversed(range(bits.ndim)):  # 1 + row-major position; wraps like the sums (a checksum)
            iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis, out_sharding=sharding)
            weights, stride = weights + iota * jnp.uint32(stride % 2**32), stride * bits.shape[axis]
        return jnp.stack([bits.sum(dtype=jnp.uint32), (bits * weights).sum(dtype=jnp.uint32)])

    return [one(x) for x in leaves]


def fingerprints(state: Any) -> dict[str, list[int]]:
    """Leaf name -> two 32-bit checksums of its bits (a plain sum and a position-weighted one, both wrapping),
    computed where the arrays live; a flipped, zeroed or moved word changes at least one of them."""
    named = jax.tree_util.tree_flatten_with_path(state)[0]
    sums = jax.device_get(_fingerprint_arrays([x for _, x in named]))
    return {_leaf_name(path): [int(v) for v in s] for (path, _), s in zip(named, sums)}


def check_fingerprints(state: Any, expected: dict[str, list[int]], where: str) -> None:
    """Raise `CorruptCheckpoint` naming the leaves whose restored bits differ from the saved fingerprints."""
    bad = sorted(name for name, value in fingerprints(state).items() if expected.get(name, value) != value)
    if bad:
        more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise CorruptCheckpoint(
            f"{where} is corrupted: the arrays {', '.join(bad[:_MAX_LISTED])}{more} differ "
            f"from the checksums saved with them"
        )


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    return {
        STATE: ocp.StandardCheckpointHandler(),
        DATA: grain.checkpoint.CheckpointHandler(),
        META: ocp.JsonCheckpointHandler(),
    }


def _leaf_name(path: tuple[Any, ...]) -> str:
    """Orbax's name for a leaf: its key path joined with dots."""
    return ".".join(ocp.tree.str_keypath(path))


def _describe(shape: Any, dtype: Any) -> str:
    return f"{jax.numpy.dtype(dtype).name}[{','.join(map(str, shape))}]"


def abstract_like(state: Any) -> Any:
    """`jax.ShapeDtypeStruct` leaves (shape, dtype, sharding) of a live state: the target of a restore.

    To restore onto another mesh, build the state (or this tree) with the new shardings instead.
    """

    def leaf(path: tuple[Any, ...], x: Any) -> jax.ShapeDtypeStruct:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if not isinstance(x, jax.Array):
            raise TypeError(f"abstract_like: leaf {_leaf_name(path)} is a {type(x).__name__}, not a jax.Array")
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    return jax.tree_util.tree_map_with_path(leaf, state)


def check_against_stored(stored: Any, abstract: Any, where: str) -> None:
    """Raise `CheckpointError` naming each leaf that is missing, extra, or of another shape / dtype."""
    on_disk = {m.name: m for m in jax.tree.leaves(getattr(stored, "tree", stored))}
    wanted = {_leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    problems = [
        f"{name}: expected {_describe(wanted[name].shape, wanted[name].dtype)}, missing from the checkpoint"
        for name in sorted(wanted.keys() - on_disk.keys())
    ]
    problems += [
        f"{name}: in the checkpoint ({_describe(on_disk[name].shape, on_disk[name].dtype)}) "
        f"but not in the expected state"
        for name in sorted(on_disk.keys() - wanted.keys())
    ]
    for name in sorted(wanted.keys() & on_disk.keys()):
        want, have = wanted[name], on_disk[name]
        if tuple(want.shape) != tuple(have.shape) or jax.numpy.dtype(want.dtype) != jax.numpy.dtype(have.dtype):
            problems.append(
                f"{name}: checkpoint has {_describe(have.shape, have.dtype)}, "
                f"expected {_describe(want.shape, want.dtype)}"
            )
    if problems:
        more = [f"  ... and {len(problems) - _MAX_LISTED} more"] if len(problems) > _MAX_LISTED else []
        raise CheckpointError(
            "\n".join(
                [f"{where} does not match the expected state:", *(f"  {p}" for p in problems[:_MAX_LISTED]), *more]
            )
        )


def check_restored(restored: Any, abstract: Any, where: str) -> None:
    """Raise `CheckpointError` unless `restored` has the abstract state's structure, shapes, dtypes and shardings."""
    if jax.tree.structure(restored) != jax.tree.structure(abstract):  # type: ignore[operator]  # PyTreeDef stub
        raise CheckpointError(
            f"{where}: restored tree structure {jax.tree.structure(restored)} differs from the "
            f"expected {jax.tree.structure(abstract)}"
        )
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(abstract)):
        name = _leaf_name(path)
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(
                f"{where}: leaf {name} restored as {_describe(got.shape, got.dtype)}, "
                f"expected {_describe(want.shape, want.dtype)}"
            )
        if want.sharding is not None and not got.sharding.is_equivalent_to(want.sharding, got.ndim):
            raise CheckpointError(
                f"{where}: leaf {name} restored with sharding {got.sharding}, expected {want.sharding}"
            )


class Checkpointer:
    """Periodic, asynchronous checkpoints of a training run, keeping the newest `keep`.

    `save` writes at multiples of `save_every` (or when `force`, e.g. at the end of training, or on a preemption
    signal in a multi-process run) and returns as soon as the arrays are copied off the device, so the caller may
    donate the state to the next step. Every process of a multi-process run must make the same calls.
    """

    def __init__(self, directory: str | Path, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every ({save_every}) and keep ({keep}) must be at least 1")
        self.directory = Path(directory).absolute()
        policy = checkpoint_managers.AnySavePolicy(
            [checkpoint_managers.FixedIntervalPolicy(save_every), checkpoint_managers.PreemptionCheckpointingPolicy()]
        )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, save_decision_policy=policy
        )
        self._manager = ocp.CheckpointManager(self.directory, item_handlers=_item_handlers(), options=options)

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: grain.DatasetIterator | None = None,
        meta: dict[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Checkpoint `state` (and the iterator position, and `meta`) as `step` if it is due; True if saved.

        A step that is already saved is skipped (False), so a forced final save may follow a periodic one.
        """
        if step in self._manager.all_steps() or not (force or self._manager.should_save(step)):
            return False
        meta = {**(meta or {}), FINGERPRINTS: fingerprints(state)}
        try:
            json.dumps(meta, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint meta must be plain JSON: {e}") from None
        items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        with _write_errors(self.directory):
            return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(
        self, abstract_state: Any, data_iterator: grain.DatasetIterator | None = None, step: int | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Read `step` (default: the latest) onto `abstract_state`'s shardings; returns `(state, meta)`.

        `abstract_state` is a tree of `jax.ShapeDtypeStruct` with shardings (see `abstract_like`). When
        `data_iterator` is given its position is restored in place.
        """
        self.wait()
        step = _resolve_step(self._manager, self.directory, step)
        where = f"checkpoint {self.directory / str(step)}"
        items = _stored_items(self._manager, step, where)
        if STATE not in items:
            raise CheckpointError(f"{where} has no training state")
        if data_iterator is not None and DATA not in items:
            raise CheckpointError(f"{where} was saved without a data iterator position")
        check_against_stored(items[STATE], abstract_state, where)
        args = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
        if data_iterator is not None:
            args[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # orbax / tensorstore / grain raise many types; name the checkpoint
            raise CorruptCheckpoint(f"cannot read {where}: {type(e).__name__}: {e}") from e
        check_restored(restored[STATE], abstract_state, where)
        meta = dict(restored[META] or {})
        if FINGERPRINTS in meta:
            check_fingerprints(restored[STATE], meta.pop(FINGERPRINTS), where)
        return restored[STATE], meta

    def quarantine(self, step: int) -> Path:
        """Move a corrupt step aside (renamed, never deleted) so it is neither restored nor rotated into again."""
        source = self.directory / str(step)
        target = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            source.rename(target)
        self._manager.reload()
        return target

    def wait(self) -> None:
        """Block until the last asynchronous save is committed."""
        with _write_errors(self.directory):
            self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


@contextlib.contextmanager
def _write_errors(directory: Path):
    """Turn a failed checkpoint write (raised here, or in orbax's writer threads and re-raised here) into an
    `OSError` naming the folder and the cause, e.g. a full disk, instead of tensorstore's status text."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        code = _OS_ERROR_CODE.search(str(e))
        if code is None:
            raise
        errno_ = int(code.group(1))
        raise OSError(
            errno_,
            f"cannot write a checkpoint in {directory}: {os.strerror(errno_)} (free space or "
            f"point train.output_dir elsewhere, then run the same command again to resume)",
        ) from e


def _resolve_step(manager: ocp.CheckpointManager, directory: Path, step: int | None) -> int:
    steps = manager.all_steps()
    if step is None:
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        return max(steps)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; saved steps: {sorted(steps)}")
    return step


def _stored_items(manager: ocp.CheckpointManager, step: int, where: str) -> dict[str, Any]:
    """Item name -> stored metadata (the array tree for `state`) of one saved step."""
    try:
        items = manager.metadata(step).item_metadata
        return dict(items.items())
    except Exception as e:
        raise CorruptCheckpoint(f"cannot read the metadata of {where}: {type(e).__name__}: {e}") from e


def committed_steps(checkpoint_dir: str | Path) -> list[int]:
    """The steps whose checkpoints are complete, oldest first: orbax renames a step's temporary folder to the bare
    step number once every item is written. No orbax manager is opened (nothing is created)."""
    directory = Path(checkpoint_dir)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def read_meta(checkpoint_dir: str | Path, step: int | None = None) -> dict[str, Any]:
    """Only the JSON meta of a checkpoint (default: the latest step), without building a TrainState."""
    directory = Path(checkpoint_dir).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint folder {directory} does not exist")
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(
        directory, item_handlers={META: ocp.JsonCheckpointHandler()}, options=options
    ) as manager:
        step = _resolve_step(manager, directory, step)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))
        except Exception as e:
            raise CorruptCheckpoint(
                f"cannot read the meta of checkpoint {directory / str(step)}: {type(e).__name__}: {e}"
            ) from e
    meta = dict(restored[META] or {})
    meta.pop(FINGERPRINTS, None)
    return meta


def save_meta(checkpoint_dir: str | Path, step: int, meta: dict[str, Any]) -> Path:
    """Write a step that holds only the JSON meta (an import checkpoint adds its parameters beside it); returns
    the step folder."""
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(
        Path(checkpoint_dir).absolute(), item_handlers={META: ocp.JsonCheckpointHandler()}, options=options
    ) as manager:
        manager.save(step, args=ocp.args.Composite(**{META: ocp.args.JsonSave(meta)}))
    return Path(checkpoint_dir).absolute() / str(step)
