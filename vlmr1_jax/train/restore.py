"""Our training checkpoints as models outside training: restore one for evaluation or export (an HF folder is
imported as one by converters/import_hf.py).

A training checkpoint holds the whole `TrainState` (`vlmr1_jax.train.checkpoint`). To read it we rebuild the
abstract state the trainer built from the JSON meta alone (model config, dtypes, LoRA, optimizer, reference) with
`jax.eval_shape`, so nothing is initialised, then let the `Checkpointer` check and restore it onto `mesh`.

An import checkpoint (kind "import", `vlmr1 import-hf`) holds parameters only: `<step>/params` is an HF-layout
safetensors folder (legacy names, one tensor per layer, the run's param_dtype, config.json) with a checksum
manifest, beside the usual `<step>/meta`. It is written and read one tensor at a time, so importing, loading and
exporting it never hold more than one tensor (or, when loading, the model on its devices) whatever the model
size; the optimizer state is created when training starts, on the devices. Orbax would need each stacked
parameter whole (one array per leaf: 3.2 GB for the 3B's MLP kernels in fp32, 77 GB for a 72B's); the per-layer
HF layout also keeps one layout table (each model family's `params`) for every safetensors file we read or write.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlmr1_jax.config import MeshConfig, RunConfig, from_dict
from vlmr1_jax.filenames import CHECKSUMS_FILE
from vlmr1_jax.models.family import VisionLanguageModel, config_from_dict, family_of
from vlmr1_jax.models.hf_weights import load_hf_model
from vlmr1_jax.parallel.mesh import logical_to_spec, make_mesh
from vlmr1_jax.rl.lora import apply_lora, merge_lora
from vlmr1_jax.rl.state import TrainState, current_model, init_train_state, make_optimizer
from vlmr1_jax.train.checkpoint import META, STATE, Checkpointer, CheckpointError, read_meta
from vlmr1_jax.train.setup import dtype_of, frozen_dtype_of

CHECKPOINTS = "checkpoints"
KINDS = ("grpo", "sft", "import")
PARAMS = "params"  # an import checkpoint's parameter folder inside its step folder


def find_checkpoint(path: str | os.PathLike) -> tuple[Path, int | None] | None:
    """(checkpoints folder, step or None for the latest) when `path` is a run folder, its `checkpoints` folder or
    one step folder of it; None when it is none of these."""
    path = Path(path).absolute()
    if not path.is_dir():
        return None
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS, None
    if path.name.isdigit() and ((path / STATE).is_dir() or (path / META).is_dir()):
        return path.parent, int(path.name)
    if any(p.name.isdigit() and ((p / STATE).is_dir() or (p / META).is_dir()) for p in path.iterdir() if p.is_dir()):
        return path, None
    return None


def _locate(path: str | os.PathLike, step: int | None) -> tuple[Path, int | None]:
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"{path}: not a checkpoint (expected a run folder with {CHECKPOINTS}/<step>/, a "
            f"{CHECKPOINTS} folder, or one <step> folder holding state/ and meta/)"
        )
    directory, at = found
    if at is not None and step is not None and at != step:
        raise ValueError(f"{path} is the folder of step {at}, but step {step} was asked for")
    return directory, at if at is not None else step


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """`dataclasses.asdict(RunConfig)` (as stored in checkpoint meta) back to a RunConfig."""
    return from_dict(data)


def _parse_meta(meta: dict[str, Any], where: str) -> tuple[RunConfig, Any, str]:
    missing = [k for k in ("run_config", "model_config", "kind") if k not in meta]
    if missing:
        raise CheckpointError(f"{where}: meta lacks {missing}; not a vlmr1-jax training checkpoint")
    if meta["kind"] not in KINDS:
        raise CheckpointError(f"{where}: meta kind {meta['kind']!r} is not one of {KINDS}")
    try:
        return run_config_from_dict(meta["run_config"]), config_from_dict(meta["model_config"]), meta["kind"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot read the configs in its meta: {e}") from e


def _abstract_train_state(run: RunConfig, model_cfg: Any, kind: str, mesh: Mesh) -> tuple[nnx.GraphDef, TrainState]:
    """The graphdef and the abstract TrainState (ShapeDtypeStructs placed on `mesh` by their logical axes) that
    the trainer of `kind` built for `run`."""
    with_reference = kind == "grpo" and run.grpo.beta > 0
    optimizer, _ = make_optimizer(run.optim, max(1, run.train.max_steps))
    graphdefs: list[nnx.GraphDef] = []

    def build() -> TrainState:
        model = family_of(model_cfg).model_class(
            model_cfg, rngs=nnx.Rngs(0), dtype=dtype_of(run.model.dtype), param_dtype=dtype_of(run.model.param_dtype)
        )
        if run.train.trainable == "lora":
            apply_lora(model, run.lora.rank, run.lora.alpha, seed=run.train.seed)
        graphdef, state = init_train_state(
            model, run.train.trainable, optimizer, with_reference, frozen_dtype_of(run.model)
        )
        graphdefs.append(graphdef)
        return state

    abstract = jax.eval_shape(build)

    def place(leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            axes = leaf.get_metadata().get("logical_axes") or (None,) * len(value.shape)
            sharding = NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh))
            return leaf.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, PartitionSpec()))

    return graphdefs[0], jax.tree.map(place, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))


def tokenizer_dir_of(run: RunConfig) -> str | None:
    """The run's tokenizer folder: model.tokenizer, else the HF model it started from; None = the vendored one."""
    return run.model.tokenizer or run.model.hf_model or None


def checkpoint_meta(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The JSON meta of a checkpoint (run folder, `checkpoints` folder or step folder; default the latest step)."""
    directory, step = _locate(path, step)
    meta = read_meta(directory, step)
    _parse_meta(meta, str(directory))
    return meta


def _import_params(directory: Path, step: int | None) -> Path:
    """The parameter folder of the import checkpoint at `step` (default: the latest) of `directory`."""
    if step is None:
        step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    folder = directory / str(step) / PARAMS
    if not (folder / CHECKSUMS_FILE).is_file():
        raise CheckpointError(
            f"{folder}: an import checkpoint needs its parameters there, with {CHECKSUMS_FILE}; "
            f"run `vlmr1 import-hf` again"
        )
    return folder


def imported_params(path: str | os.PathLike, step: int | None = None) -> Path | None:
    """The parameter folder (HF layout, checksummed) when the checkpoint at `path` / `step` (default: the latest)
    is an import checkpoint; None for training checkpoints."""
    directory, step = _locate(path, step)
    meta = read_meta(directory, step)
    return _import_params(directory, step) if _parse_meta(meta, str(directory))[2] == "import" else None


def load_checkpoint(
    path: str | os.PathLike, step: int | None = None, mesh: Mesh | None = None
) -> tuple[VisionLanguageModel, dict[str, Any], str | None]:
    """The policy of a checkpoint (LoRA adapters kept, not merged), its meta, and its tokenizer folder.

    `path`: a run folder, its `checkpoints` folder or a step folder; `step` defaults to the latest (or the step
    folder's). Parameters land on `mesh` (default: every device on the fsdp axis); those of an import checkpoint
    are read one tensor at a time and checked against its checksums.
    """
    directory, step = _locate(path, step)
    meta = read_meta(directory, step)
    run, model_cfg, kind = _parse_meta(meta, str(directory))
    mesh = make_mesh(MeshConfig()) if mesh is None else mesh
    if kind == "import":
        folder = _import_params(directory, step)
        model = load_hf_model(
            folder, dtype=dtype_of(run.model.dtype), param_dtype=dtype_of(run.model.param_dtype), mesh=mesh
        )
        if model.cfg != model_cfg:
            raise CheckpointError(f"{folder}/config.json does not describe the model of its meta ({directory})")
        return model, meta, tokenizer_dir_of(run)
    graphdef, abstract = _abstract_train_state(run, model_cfg, kind, mesh)
    checkpointer = Checkpointer(directory, save_every=1, keep=1, async_save=False)
    try:
        state, meta = checkpointer.restore(abstract, step=step)
    finally:
        checkpointer.close()
    return current_model(graphdef, state), meta, tokenizer_dir_of(run)


def restore_for_export(
    path: str | os.PathLike, step: int | None = None, mesh: Mesh | None = None
) -> tuple[nnx.State, Any, str | None]:
    """Parameters of a checkpoint with LoRA merged into the kernels (a plain Qwen2.5-VL, as `export_release`
    takes), the model config, and the tokenizer folder. The whole TrainState of a training checkpoint is
    restored (peak: its size); `vlmr1 export` streams import checkpoints from their files instead."""
    model, _, tokenizer_dir = load_checkpoint(path, step, mesh)
    merge_lora(model)
    return nnx.state(model, nnx.Param), model.cfg, tokenizer_dir
