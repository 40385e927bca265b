"""Device mesh, the one logical-axis rule table, and shardings for parameter trees and batches.

Mesh axes are `data, fsdp, tensor` (MaxText naming). Parameters carry logical axis names (`embed`, `mlp`, ...);
activations and the KV cache are pinned with `constrain` at block boundaries. `LOGICAL_RULES` maps each name to
mesh axes. An axis whose size does not divide by its mesh axes is replicated instead of failing (with a warning,
once), so one rule table serves every model size and mesh shape.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from vlmr1_jax.config import MeshConfig

log = logging.getLogger(__name__)
M = TypeVar("M", bound=nnx.Module)

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # activations and KV cache: rows over data x fsdp, heads / vocab over tensor, hidden and length replicated
    "batch": ("data", "fsdp"),
    "length": (),
    "act_embed": (),
    # parameters (heads, kv_heads, mlp and vocab also name activation axes)
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "vision_embed": ("fsdp",),
    "vision_mlp": ("tensor",),
    "vision_heads": ("tensor",),
    "vision_merge": ("fsdp",),
    "lora_rank": (),
    "layers": (),  # the leading axis of stacked (scanned) layer parameters
}


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD propagation from the logical rules)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide by the fixed mesh axes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh | AbstractMesh) -> P:
    """PartitionSpec for one array: each logical name's mesh axes, dropped (with a warning) where the dimension
    does not divide."""
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(axes, shape):
        mesh_axes = tuple(a for a in LOGICAL_RULES.get(name, ()) if a not in used and mesh.shape[a] > 1) if name else ()
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if mesh_axes and dim % ways == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        else:
            if mesh_axes:
                _warn_replicated(name, dim, mesh_axes, ways)
            spec.append(None)
    return P(*spec)


@functools.cache
def _warn_replicated(name: str, dim: int, mesh_axes: tuple[str, ...], ways: int) -> None:
    log.warning(
        "logical axis %r of size %d does not divide over mesh axes %s (%d ways): replicated there; "
        "choose mesh sizes that divide it to shard it",
        name,
        dim,
        "x".join(mesh_axes),
        ways,
    )


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation to the layout of its logical axes on the current mesh (`jax.set_mesh`); outside a mesh
    context (one device, tests) it is the identity."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for every leaf of an (abstract) nnx.State from its `logical_axes` metadata."""

    def one(variable):
        axes = variable.get_metadata().get("logical_axes") or (None,) * len(variable.shape)
        return variable.replace(NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Shard the batch axis over (data, fsdp); replicate the rest."""
    spec: list[tuple[str, ...] | None] = [None] * ndim
    spec[batch_axis] = tuple(a for a in LOGICAL_RULES["batch"] if mesh.shape[a] > 1) or None
    return NamedSharding(mesh, P(*spec))


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """`jax.distributed.initialize`. Arguments default to the COORDINATOR (host:port), NUM_PROCESSES and
    PROCESS_ID environment variables; with none set, JAX auto-detects TPU pods, Slurm, Open MPI and Kubernetes."""
    env = os.environ
    coordinator = coordinator or env.get("COORDINATOR")
    num_processes = num_processes if num_processes is not None else _env_int("NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("PROCESS_ID")
    kwargs: dict[str, Any] = {
        k: v
        for k, v in dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id).items()
        if v is not None
    }
    jax.distributed.initialize(**kwargs)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def create_sharded(make: Callable[[], M], mesh: Mesh) -> M:
    """Build a module with every parameter born on its target sharding (no replicated host copy first)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=state_shardings(abstract, mesh))()
    return nnx.merge(graphdef, state)
