"""HF safetensors folders -> our model: the reading side (the writers are in converters/hf.py). The model family
comes from the folder's `config.json` (`architectures`), and the layout is that family's table (`ModelFamily.layout`).

Reading accepts the hub/legacy names (`visual.*`, `model.*`, `lm_head.weight`) and the transformers 5.x in-memory
names (`model.visual.*`, `model.language_model.*`). Tensors are read one at a time from the shard headers' offsets
(`safetensors_read`, no memory map) and placed straight onto their target sharding, so loading, importing and
re-exporting hold one tensor (one layer of a stacked parameter) on the host at a time, whatever the model size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmr1_jax.filenames import CHECKSUMS_FILE, CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from vlmr1_jax.models.family import VisionLanguageModel, config_from_hf, family_of
from vlmr1_jax.models.safetensors_read import read_header, read_tensor, sha256
from vlmr1_jax.parallel.mesh import state_shardings


def read_config(model_dir: str | os.PathLike) -> Any:
    """The model config of an HF folder, in its family's config class; errors name the file."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE} in the model folder")
    try:
        return config_from_hf(json.loads(path.read_text()), str(path))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def _canonical_names(model_dir: Path) -> Any:
    """The folder's family's canonical HF naming (legacy names kept as stored when there is no config.json)."""
    if not (model_dir / CONFIG_FILE).is_file():
        return lambda name: name
    return family_of(read_config(model_dir)).layout.canonical_hf_name


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor of an HF folder, located from the shard headers alone; `sha256` is what the folder's checksum
    manifest (import checkpoints) says its bytes hash to, checked on every read."""

    name: str  # canonical (legacy) HF name
    file: Path
    info: dict[str, Any]  # the safetensors header entry: dtype, shape, data_offsets
    data_start: int
    sha256: str | None = None
    part: tuple[int, int] | None = None  # (k, n): block k of n equal row blocks of a fused stored tensor

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.info["shape"])
        return shape if self.part is None else (shape[0] // self.part[1], *shape[1:])

    def read(self) -> np.ndarray:
        """The tensor's values, verified: its checksum (when the folder has a manifest) and finiteness (inf / NaN
        weights would train or serve silent garbage)."""
        value = read_tensor(self.file, self.info, self.data_start)
        if self.sha256 is not None and sha256(value) != self.sha256:
            raise ValueError(
                f"{self.file}: tensor {self.name!r} does not match its checksum in "
                f"{self.file.parent / CHECKSUMS_FILE} (the file is corrupted)"
            )
        if self.part is not None:
            rows = self.shape[0]
            value = np.ascontiguousarray(value[self.part[0] * rows : (self.part[0] + 1) * rows])
        bad = value.size - int(np.count_nonzero(np.isfinite(value)))
        if bad:
            raise ValueError(f"{self.file}: tensor {self.name!r} holds {bad} inf/NaN values; refusing broken weights")
        return value


def stored_tensors(
    model_dir: str | os.PathLike, canonical_hf_name: Callable[[str], str | tuple[str, ...]] | None = None
) -> dict[str, StoredTensor]:
    """Every tensor of an HF folder (sharded with an index, or one `model.safetensors`) by canonical name, in
    file order, from the headers alone. A stored name that `canonical_hf_name` maps to several names is a fused
    tensor: each name reads its equal block of rows. A folder with a checksum manifest must match it name by name,
    dtype and shape; errors name the file."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({e})") from e
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index}: shards listed in weight_map are missing: {missing}")
    elif (model_dir / SINGLE_FILE).is_file():
        weight_map = None
    else:
        raise FileNotFoundError(f"{model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    files = list(dict.fromkeys(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
    headers = {f: read_header(model_dir / f) for f in files}
    if weight_map is None:
        weight_map = dict.fromkeys(headers[SINGLE_FILE][0], SINGLE_FILE)
    manifest = read_checksums(model_dir)
    if canonical_hf_name is None:  # the caller did not name the family: read it from the folder's config.json
        canonical_hf_name = _canonical_names(model_dir)
    rank = {f: i for i, f in enumerate(files)}
    out: dict[str, StoredTensor] = {}
    for stored, file in sorted(weight_map.items(), key=lambda kv: (rank[kv[1]], _offset(headers[kv[1]], kv[0]))):
        header, _, start = headers[file]
        if stored not in header:
            raise KeyError(f"{index}: maps {stored!r} to {file}, which does not hold it")
        names = canonical_hf_name(stored)
        parts: list[tuple[str, tuple[int, int] | None]] = (
            [(names, None)] if isinstance(names, str) else [(n, (k, len(names))) for k, n in enumerate(names)]
        )
        as_stored = (header[stored]["dtype"], tuple(header[stored]["shape"]))
        for name, part in parts:
            if name in out:
                raise KeyError(f"{model_dir}: tensor {name!r} appears twice")
            digest = None
            if manifest is not None:  # our own checkpoints: every tensor stored whole under its canonical name
                want = manifest.get(name)
                if part is not None or want is None or (want["dtype"], tuple(want["shape"])) != as_stored:
                    raise ValueError(
                        f"{model_dir / file}: tensor {name!r} ({as_stored[0]} {list(as_stored[1])}) is not as "
                        f"{CHECKSUMS_FILE} records it ({want})"
                    )
                digest = want["sha256"]
            out[name] = StoredTensor(name, model_dir / file, header[stored], start, digest, part)
    if manifest is not None and manifest.keys() != out.keys():
        raise ValueError(
            f"{model_dir}: {CHECKSUMS_FILE} lists tensors the shards lack: {sorted(manifest.keys() - out.keys())[:8]}"
        )
    return out


def _offset(header: tuple[dict[str, Any], dict[str, str], int], name: str) -> int:
    entry = header[0].get(name)
    return entry["data_offsets"][0] if entry else -1


def read_checksums(model_dir: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """name -> {dtype, shape, sha256} from a folder's checksum manifest; None when it has none."""
    path = Path(model_dir) / CHECKSUMS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("algorithm") != "sha256" or not isinstance(data.get("tensors"), dict):
            raise ValueError('expected {"algorithm": "sha256", "tensors": {...}}')
        return data["tensors"]
    except (json.JSONDecodeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a checksum manifest ({e})") from e


def iter_hf_tensors(model_dir: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """(canonical HF name, numpy array) for every tensor, one at a time, shard by shard."""
    for name, stored in stored_tensors(model_dir).items():
        yield name, stored.read()


def check_stored(
    stored: Mapping[str, StoredTensor], expected: Mapping[str, tuple[int, ...]], cfg: Any, where: str
) -> None:
    """Refuse, from the headers alone, a folder with an unexpected, missing or misshapen tensor (`expected`: HF
    name -> HF shape); a tied model's stored copy of the embedding (`TIED_HEAD`) is allowed."""
    for name, tensor in stored.items():
        if name not in expected:
            if name == family_of(cfg).layout.TIED_HEAD and cfg.text.tie_word_embeddings:
                continue  # some exports keep the tied copy; it equals embed_tokens
            raise KeyError(f"{where}: unexpected tensor {name!r} (not part of a {cfg.family} model with this config)")
        if tensor.shape != tuple(expected[name]):
            raise ValueError(
                f"{where}: tensor {name!r} has shape {tensor.shape}, config expects {tuple(expected[name])}"
            )
    missing = [name for name in expected if name not in stored]
    if missing:
        raise KeyError(f"{where}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def folder_tensors(model_dir: str | os.PathLike, cfg: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(legacy HF name, array as stored) of an HF folder, one at a time in `hf_entries` order, after checking
    from the headers that it holds exactly the tensors `cfg` needs: the source of a streaming export."""
    layout = family_of(cfg).layout
    stored = stored_tensors(model_dir, layout.canonical_hf_name)
    expected = layout.expected_hf_shapes(cfg)
    check_stored(stored, expected, cfg, str(model_dir))
    return ((name, stored[name].read()) for name in expected)


def load_hf_state(
    model_dir: str | os.PathLike,
    abstract_state: nnx.State,
    cfg: Any,
    shardings: dict[str, jax.sharding.Sharding] | None = None,
) -> nnx.State:
    """Fill an abstract model state from an HF folder; every key must be used and every shape must match.

    Each tensor goes straight to its device(s) (`shardings`: our path -> sharding; default: the default device),
    so only one tensor is on the host at a time; a stacked parameter is assembled there one layer at a time.
    """
    layout = family_of(cfg).layout
    targets = layout.flat_paths(abstract_state)
    entries = layout.hf_entries(abstract_state)
    stored = stored_tensors(model_dir, layout.canonical_hf_name)
    expected = {name: layout.hf_shape(path, shape, cfg) for name, path, _, shape in entries}
    check_stored(stored, expected, cfg, str(model_dir))
    loaded: dict[str, jax.Array] = {}
    for name, path, layer, _ in entries:
        value = layout.from_hf_tensor(path, stored[name].read())
        target = targets[path]
        value = value.astype(target.dtype) if value.dtype != target.dtype else value
        sharding = None if shardings is None else shardings[path]
        if layer is None:
            loaded[path] = jax.device_put(value, sharding)
        else:
            if path not in loaded:
                loaded[path] = _zeros(target.shape, target.dtype, sharding)
            loaded[path] = _set_layer(loaded[path], layer, value)
    flat = [(tuple(int(k) if k.isdigit() else k for k in p.split(".")), targets[p].replace(loaded[p])) for p in targets]
    return nnx.from_flat_state(flat)


def _zeros(shape: tuple[int, ...], dtype: Any, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """A zero-filled (stacked) parameter born on its target devices."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack: jax.Array, layer: int, value: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, value.astype(stack.dtype), layer, 0)


def load_hf_model(
    model_dir: str | os.PathLike, *, dtype=np.float32, param_dtype=np.float32, mesh: jax.sharding.Mesh | None = None
) -> VisionLanguageModel:
    """Build our model from an HF folder (of any registered family), optionally sharded over `mesh`."""
    cfg = read_config(model_dir)
    family = family_of(cfg)
    make = lambda: family.model_class(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = None
    if mesh is not None:
        flat = family.layout.flat_paths(state_shardings(abstract, mesh))
        shardings = {path: var.get_value() for path, var in flat.items()}
    return nnx.merge(graphdef, load_hf_state(model_dir, abstract, cfg, shardings))
