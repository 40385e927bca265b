"""HF Qwen2.5-VL safetensors <-> our parameter tree, through one table of name rules.

Reading accepts the hub/legacy names (`visual.*`, `model.*`, `lm_head.weight`) and the transformers 5.x in-memory
names (`model.visual.*`, `model.language_model.*`); writing emits the legacy names every reader accepts
(QWEN25VL-PORT.md 4.1-4.3). Tensors are read one at a time and placed straight onto their target sharding.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from vlmr1_jax.models.qwen2_5_vl.config import Qwen25VLConfig, from_hf_config
from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# (our flattened path, HF legacy name). Kernels are transposed ([in, out] vs torch's [out, in]); the patch
# embedding is a Conv3d weight flattened to a matmul; everything else is copied.
NAME_RULES: tuple[tuple[str, str], ...] = (
    (r"visual\.patch_embed", r"visual.patch_embed.proj.weight"),
    (r"visual\.blocks\.(\d+)\.norm([12])\.scale", r"visual.blocks.\1.norm\2.weight"),
    (r"visual\.blocks\.(\d+)\.attn\.(qkv|proj)\.(kernel|bias)", r"visual.blocks.\1.attn.\2.\3"),
    (r"visual\.blocks\.(\d+)\.mlp\.(gate|up|down)\.(kernel|bias)", r"visual.blocks.\1.mlp.\2_proj.\3"),
    (r"visual\.merger\.ln_q\.scale", r"visual.merger.ln_q.weight"),
    (r"visual\.merger\.fc1\.(kernel|bias)", r"visual.merger.mlp.0.\1"),
    (r"visual\.merger\.fc2\.(kernel|bias)", r"visual.merger.mlp.2.\1"),
    (r"text\.embed", r"model.embed_tokens.weight"),
    (r"text\.layers\.(\d+)\.input_norm\.scale", r"model.layers.\1.input_layernorm.weight"),
    (r"text\.layers\.(\d+)\.post_norm\.scale", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"text\.layers\.(\d+)\.attn\.(q|k|v|o)\.(kernel|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"text\.layers\.(\d+)\.mlp\.(gate|up|down)\.(kernel|bias)", r"model.layers.\1.mlp.\2_proj.\3"),
    (r"text\.norm\.scale", r"model.norm.weight"),
    (r"text\.lm_head\.kernel", r"lm_head.kernel"),
)
_TO_HF = [(re.compile(f"^{ours}$"), hf) for ours, hf in NAME_RULES]


def to_hf_name(path: str) -> str:
    """Our dotted parameter path -> the legacy HF tensor name."""
    for pattern, template in _TO_HF:
        if pattern.match(path):
            return pattern.sub(template, path).replace(".kernel", ".weight")
    raise KeyError(f"no HF name rule for parameter {path!r}")


def canonical_hf_name(name: str) -> str:
    """Map transformers >= 4.52 / 5.x in-memory names onto the legacy hub names."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def to_hf_tensor(path: str, value: np.ndarray, cfg: Qwen25VLConfig) -> np.ndarray:
    """Our array -> the HF tensor layout."""
    if path == "visual.patch_embed":
        v = cfg.vision
        return np.ascontiguousarray(value.T).reshape(
            v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if path.endswith(".kernel"):
        return np.ascontiguousarray(value.T)
    return value


def from_hf_tensor(path: str, value: np.ndarray) -> np.ndarray:
    """HF tensor -> our layout (the inverse of `to_hf_tensor`)."""
    if path == "visual.patch_embed":
        return np.ascontiguousarray(value.reshape(value.shape[0], -1).T)
    if path.endswith(".kernel"):
        return np.ascontiguousarray(value.T)
    return value


def flat_paths(state: nnx.State) -> dict[str, nnx.Variable]:
    """Dotted path -> Variable for every parameter of a model state."""
    return {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def read_config(model_dir: str | os.PathLike) -> Qwen25VLConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model folder")
    try:
        return from_hf_config(json.loads(path.read_text()))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def safetensors_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """HF tensor name -> the shard file holding it (sharded with an index, or one `model.safetensors`)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index}: shards listed in weight_map are missing: {missing}")
        return {name: model_dir / f for name, f in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


def iter_hf_tensors(model_dir: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """(canonical HF name, numpy array) for every tensor, one at a time, shard by shard."""
    by_file: dict[Path, list[str]] = {}
    for name, file in safetensors_files(model_dir).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="numpy") as f:
            for name in names:
                yield canonical_hf_name(name), f.get_tensor(name)


def load_hf_state(model_dir: str | os.PathLike, abstract_state: nnx.State, cfg: Qwen25VLConfig,
                  place: Callable[[str, np.ndarray], jax.Array] | None = None) -> nnx.State:
    """Fill an abstract model state from an HF folder; every key must be used and every shape must match.

    `place(path, array)` puts one tensor on its device(s) (default: the default device), so only one tensor is on
    the host at a time.
    """
    targets = flat_paths(abstract_state)
    hf_to_ours = {to_hf_name(p): p for p in targets}
    loaded: dict[str, jax.Array] = {}
    where = str(model_dir)
    for name, tensor in iter_hf_tensors(model_dir):
        path = hf_to_ours.get(name)
        if path is None:
            if name == "lm_head.weight" and cfg.text.tie_word_embeddings:
                continue  # some exports keep the tied copy; it equals embed_tokens
            raise KeyError(f"{where}: unexpected tensor {name!r} (not part of a Qwen2.5-VL with this config)")
        if path in loaded:
            raise KeyError(f"{where}: tensor {name!r} appears twice")
        value = from_hf_tensor(path, tensor)
        target = targets[path]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, config expects "
                             f"{tuple(to_hf_tensor(path, np.zeros(target.shape, np.float32), cfg).shape)}")
        dtype = target.dtype
        value = value.astype(dtype) if value.dtype != dtype else value
        loaded[path] = place(path, value) if place is not None else jax.device_put(value)
    missing = sorted(to_hf_name(p) for p in targets if p not in loaded)
    if missing:
        raise KeyError(f"{where}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    flat = [(tuple(int(k) if k.isdigit() else k for k in p.split(".")), targets[p].replace(loaded[p]))
            for p in targets]
    return nnx.from_flat_state(flat)


def load_hf_model(model_dir: str | os.PathLike, *, dtype=np.float32, param_dtype=np.float32,
                  mesh: jax.sharding.Mesh | None = None) -> Qwen25VL:
    """Build our model from an HF Qwen2.5-VL folder, optionally sharded over `mesh`."""
    cfg = read_config(model_dir)
    make = lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)  # noqa: E731
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    place = None
    if mesh is not None:
        from vlmr1_jax.parallel.mesh import state_shardings

        shardings = flat_paths(state_shardings(abstract, mesh))
        place = lambda path, value: jax.device_put(value, shardings[path].get_value())  # noqa: E731
    return nnx.merge(graphdef, load_hf_state(model_dir, abstract, cfg, place))


def hf_tensors(state: nnx.State, cfg: Qwen25VLConfig, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(legacy HF name, numpy array) for every parameter, one at a time (gathered to the host)."""
    for path, var in flat_paths(state).items():
        value = np.asarray(jax.device_get(var[...]))
        if dtype is not None:
            value = value.astype(dtype)
        yield to_hf_name(path), to_hf_tensor(path, value, cfg)


def save_hf_safetensors(state: nnx.State, cfg: Qwen25VLConfig, path: str | os.PathLike, dtype=None) -> None:
    """Write every parameter into one safetensors file with legacy names and `{"format": "pt"}` metadata."""
    tensors = dict(hf_tensors(state, cfg, dtype))
    save_file(tensors, str(path), metadata={"format": "pt"})

