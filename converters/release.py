"""Write a complete HF release folder of any model family: weights, configs, processor, tokenizer, chat template,
model card.

The layout is the hub one that transformers 4.49+ / 5.x and vLLM / vllm-ascend read. Weights are streamed tensor by
tensor (each shard's header is written first, then its tensors as they come), so one tensor is on the host at a
time: an HF folder is re-exported without building the model. Everything is written into
a temporary sibling folder, validated with `converters.check.check_export`, then moved into place in one rename
(an existing folder is only replaced with `overwrite=True`, by an atomic exchange where the OS has one).

float16 (300I Duo): weights are cast with round-to-nearest-even and never clamped or rescaled; a weight beyond
+-65504 is an error. Activation overflow (the 3B vision tower's last blocks) is a
property of inputs, not of the file: `vlmr1 check-export --forward --image REAL.jpg` measures it (see
docs/deploy-ascend.md).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from converters.check import check_export
from converters.hf import hf_tensors, write_checksums
from converters.safetensors_io import ShardWriter
from converters.targets import resolve_dtype
from vlmr1_jax.dtypes import dtype_info
from vlmr1_jax.filenames import (
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    INDEX_FILE,
    PREPROCESSOR_CONFIG_FILE,
    RELEASE_MARKER,
    SINGLE_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILES,
)
from vlmr1_jax.models.family import family_of, processor_of
from vlmr1_jax.models.hf_weights import folder_tensors, read_config
from vlmr1_jax.models.safetensors_read import sha256
from vlmr1_jax.processing.tokenizer import QWEN2_5_DIR, Tokenizer

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


class ExportError(RuntimeError):
    """The written folder failed validation; nothing was moved into place."""


def parse_size(size: int | str) -> int:
    """'5GB' -> 5 * 10**9 (decimal units as in transformers; KiB/MiB/GiB are binary); ints pass through."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not match or match.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving split of (name, bytes) into shards of at most `max_bytes` (a larger tensor gets
    a shard of its own), as transformers does."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """`model.safetensors` for one shard, else `model-0000K-of-0000N.safetensors` (1-based)."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def write_weights(
    tensors: Iterable[tuple[str, np.ndarray]],
    cfg: Any,
    folder: Path,
    dtype: str,
    max_shard_size: int | str = "5GB",
    checksums: bool = False,
) -> dict[str, str]:
    """Stream `tensors` (legacy HF name, HF-layout array, in `hf_entries` order) into safetensors shards (+ an
    index when several); returns name -> file.

    One tensor is on the host at a time: each is checked against the config's name and shape, cast to `dtype` (any
    `vlmr1_jax.dtypes` spelling), checked finite, and appended to its shard, whose header was written from the shard
    plan. Peak memory is about 2.5x the largest tensor (as read, as cast, the finiteness mask). `checksums`: also
    write the folder's checksum manifest (`vlmr1_jax.filenames.CHECKSUMS_FILE`).
    """
    info = dtype_info(dtype)
    dtype, np_dtype, code = info.name, np.dtype(info.numpy), info.safetensors
    shapes = family_of(cfg).layout.expected_hf_shapes(cfg)
    sizes = [(name, int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize) for name, shape in shapes.items()]
    shards = plan_shards(sizes, parse_size(max_shard_size))
    files = shard_file_names(len(shards))
    stream = iter(tensors)
    weight_map: dict[str, str] = {}
    digests: dict[str, tuple[str, tuple[int, ...], str]] = {}
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, naming the tensor
        for names, file in zip(shards, files):
            with ShardWriter(folder / file, [(n, code, shapes[n]) for n in names], {"format": "pt"}) as writer:
                for expected in names:
                    value = _next_tensor(stream, expected, shapes[expected]).astype(np_dtype, copy=False)
                    bad = int(value.size - np.count_nonzero(np.isfinite(value)))
                    if bad:
                        raise ValueError(
                            f"{expected}: {bad} values are inf/NaN as {dtype} "
                            f"(float16 holds |x| <= 65504); refusing to write a broken release"
                        )
                    writer.write(expected, value)
                    if checksums:
                        digests[expected] = (code, shapes[expected], sha256(value))
            weight_map.update(dict.fromkeys(names, file))
    extra = next(stream, None)
    if extra is not None:
        raise RuntimeError(f"tensor {extra[0]} is not part of a Qwen2.5-VL with this config")
    if len(files) > 1:
        index = {
            "metadata": {
                "total_size": sum(n for _, n in sizes),
                "total_parameters": sum(n for _, n in sizes) // np_dtype.itemsize,
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        _write_json(folder / INDEX_FILE, index)
    if checksums:
        write_checksums(folder, digests)
    return weight_map


def _next_tensor(stream: Iterator[tuple[str, np.ndarray]], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The next tensor of the stream, which must be `name` with `shape`."""
    got = next(stream, None)
    if got is None or got[0] != name:
        raise RuntimeError(f"parameter order changed while exporting: {got[0] if got else 'end'} != {name}")
    if tuple(got[1].shape) != tuple(shape):
        raise ValueError(f"{name}: shape {tuple(got[1].shape)}, the config expects {tuple(shape)}")
    return got[1]


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """Our default generation_config.json (used when the base model has none): stop at <|im_end|> or
    <|endoftext|>, pad with <|endoftext|>, greedy (as VLM-R1 evaluates)."""
    end_of_text = tokenizer.token_to_id("<|endoftext|>")
    return {
        "bos_token_id": end_of_text,
        "pad_token_id": tokenizer.pad_id,
        "eos_token_id": list(tokenizer.eos_ids),
        "do_sample": False,
        "use_cache": True,
    }


def _has_tokenizer(folder: Path) -> bool:
    return (folder / TOKENIZER_CONFIG_FILE).is_file() and (
        (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    )


def tokenizer_source(tokenizer_dir: str | os.PathLike | None, base_model_dir: str | os.PathLike | None) -> Path:
    """Where the release's tokenizer comes from: `tokenizer_dir`, else the base model, else the vendored set."""
    if tokenizer_dir is not None:
        if not _has_tokenizer(Path(tokenizer_dir)):
            raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer_config.json + tokenizer.json/vocab.json")
        return Path(tokenizer_dir)
    if base_model_dir is not None and _has_tokenizer(Path(base_model_dir)):
        return Path(base_model_dir)
    return QWEN2_5_DIR


def write_tokenizer(source: Path, folder: Path) -> Tokenizer:
    """Copy the tokenizer files of `source` byte for byte (the vendored set is re-saved, which adds
    tokenizer.json); add chat_template.json when the source keeps its template elsewhere."""
    if source.resolve() == QWEN2_5_DIR.resolve():
        tokenizer = Tokenizer.load(source)
        tokenizer.save(folder)
        return tokenizer
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    tokenizer = Tokenizer.load(folder)
    if not (folder / CHAT_TEMPLATE_FILE).is_file() and not (folder / "chat_template.jinja").is_file():
        _write_json(folder / CHAT_TEMPLATE_FILE, {"chat_template": tokenizer.chat_template})
    return tokenizer


def model_card(cfg: Any, target: str, dtype: str, card: Mapping[str, Any], notes: list[str]) -> str:
    """README.md: YAML front matter for the hub, then model, data, rewards, steps, final metrics, usage, notes."""
    card = dict(card)
    name = card.pop("name", f"{cfg.family} GRPO checkpoint (vlmr1-jax)")
    base = card.pop("base_model", None)
    license_ = card.pop("license", None)
    datasets = card.pop("datasets", None)
    rewards = card.pop("rewards", None)
    steps = card.pop("steps", None)
    metrics = card.pop("metrics", None) or {}
    as_list = lambda x: [x] if isinstance(x, str) else list(x or [])
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text"]
    if base:
        front.append(f"base_model: {json.dumps(str(base))}")
    if license_:
        front.append(f"license: {json.dumps(str(license_))}")
    front += ["tags:", f"- {cfg.family}", "- vlm-r1", "- grpo", "- vlmr1-jax", "---", ""]
    t, v, architecture = cfg.text, cfg.vision, family_of(cfg).architectures[0]
    body = [
        f"# {name}",
        "",
        f"A {cfg.family} model trained with GRPO (VLM-R1 recipe) in JAX by vlmr1-jax, exported in the Hugging Face "
        f"hub layout (`{architecture}`; no custom code, no `trust_remote_code`).",
        "",
        "## Model",
        "",
        f"- base model: {base or 'not recorded'}",
        f"- text: {t.num_hidden_layers} layers, hidden {t.hidden_size}, vocab {t.vocab_size}, "
        f"tied embeddings: {str(t.tie_word_embeddings).lower()}",
        "- vision: " + ", ".join(f"{key} {value}" for key, value in dataclasses.asdict(v).items()),
        f"- weights: {dtype}, export target `{target}`",
        "",
        "## Training",
        "",
        f"- data: {', '.join(as_list(datasets)) or 'not recorded'}",
        f"- rewards: {', '.join(as_list(rewards)) or 'not recorded'}",
        f"- steps: {steps if steps is not None else 'not recorded'}",
    ]
    body += [f"- {key}: {value}" for key, value in card.items()]
    body += ["", "## Final metrics", ""]
    if metrics:
        body += ["| metric | value |", "|---|---|"]
        body += [
            f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
            for key, value in metrics.items()
        ]
    else:
        body.append("not recorded")
    body += [
        "",
        "## Usage",
        "",
        "```python",
        f"from transformers import AutoProcessor, {architecture}",
        f'model = {architecture}.from_pretrained("PATH", dtype="auto")',
        'processor = AutoProcessor.from_pretrained("PATH")',
        "```",
        "",
        "Prompts follow VLM-R1: one user turn with the image(s) first, then the question and the task's "
        "reasoning template. See docs/deploy-ascend.md of vlmr1-jax for vLLM / Ascend serving.",
        "",
        "## Notes",
        "",
    ]
    body += [f"- {n}" for n in notes]
    return "\n".join(front + body) + "\n"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def check_replaceable(out: Path, overwrite: bool, marker: str = RELEASE_MARKER) -> None:
    """Refuse to write into `out` unless it is absent or empty, or (with `overwrite`) a folder we wrote before
    (it carries `marker`); never the current directory or one of its parents, whatever it holds."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; pass --overwrite to replace a folder vlmr1 wrote")
    cwd, target = Path.cwd().resolve(), out.resolve()
    if target == cwd or target in cwd.parents:
        raise FileExistsError(f"{out}: is the current directory or one of its parents; refusing to replace it")
    if not (out / marker).is_file():
        raise FileExistsError(
            f"{out}: not a folder vlmr1 wrote (no {marker} marker), so --overwrite will not delete "
            f"it; choose another --out, or remove it yourself"
        )


def write_marker(folder: Path, marker: str = RELEASE_MARKER) -> None:
    (folder / marker).write_text("written by vlmr1-jax; `--overwrite` may replace this folder\n", encoding="utf-8")


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is swapped out atomically (or, failing that, moved aside and
    restored on error) and then deleted."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(tmp, out)  # rename(2) replaces an empty folder atomically
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp)  # tmp now holds the previous release
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old / out.name, out)
        raise
    shutil.rmtree(old)


def export_release(state: nnx.State | nnx.Module, cfg: Any, out_dir: str | os.PathLike, **options: Any) -> Path:
    """Write the release folder `out_dir` of model parameters (see `export_tensors` for the options); one layer
    of a stacked parameter at a time is gathered to the host."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)
    return export_tensors(hf_tensors(state, cfg), cfg, out_dir, **options)


def export_tensors(
    tensors: Iterable[tuple[str, np.ndarray]],
    cfg: Any,
    out_dir: str | os.PathLike,
    *,
    target: str = "hf",
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer_dir: str | os.PathLike | None = None,
    base_model_dir: str | os.PathLike | None = None,
    card: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the release folder `out_dir` for `target` ("hf", "ascend-a2", "ascend-310p") from a stream of HF
    tensors (legacy name, HF-layout array, in `hf_entries` order), one tensor on the host at a time.

    `dtype` (bfloat16 / bf16, float16 / fp16, float32 / fp32) defaults to the target's (bfloat16; float16 for
    310P, which allows nothing else).
    Tokenizer files come from `tokenizer_dir`, else `base_model_dir`, else the vendored Qwen2.5 set;
    generation_config.json is copied from `base_model_dir` when it has one. `card` fills README.md (keys name,
    base_model, license, datasets, rewards, steps, metrics, plus any others). Returns the folder.
    """
    dtype = resolve_dtype(target, dtype)
    out = Path(out_dir).absolute()
    check_replaceable(out, overwrite)
    tmp = make_temp_sibling(out)
    try:
        _write_release(tensors, cfg, tmp, target, dtype, max_shard_size, tokenizer_dir, base_model_dir, card or {})
        write_marker(tmp)
        problems = check_export(tmp, target)
        if problems:
            raise ExportError(
                f"export to {out} failed validation; nothing was written there:\n  " + "\n  ".join(problems)
            )
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target == "ascend-310p":
        warnings.warn(
            f"{out}: float16 activations of Qwen2.5-VL's last vision blocks can exceed 65504 on real "
            f"images (the weights are fine); measure with `vlmr1 check-export {out} --target "
            f"ascend-310p --forward --image <real image>` before deploying",
            stacklevel=3,
        )
    return out


def make_temp_sibling(out: Path) -> Path:
    """A fresh hidden folder beside `out` (same file system, so it can be renamed into place), with the usual
    folder permissions rather than mkdtemp's private ones."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def _write_release(
    tensors: Iterable[tuple[str, np.ndarray]],
    cfg: Any,
    folder: Path,
    target: str,
    dtype: str,
    max_shard_size: int | str,
    tokenizer_dir: str | os.PathLike | None,
    base_model_dir: str | os.PathLike | None,
    card: Mapping[str, Any],
) -> None:
    """Every file of the release into `folder` (no validation)."""
    write_weights(tensors, cfg, folder, dtype, max_shard_size)
    _write_json(folder / CONFIG_FILE, family_of(cfg).to_hf_config(cfg, dtype))
    preprocessor = processor_of(cfg).hf_preprocessor_config(cfg)
    _write_json(folder / PREPROCESSOR_CONFIG_FILE, preprocessor)
    source = tokenizer_source(tokenizer_dir, base_model_dir)
    tokenizer = write_tokenizer(source, folder)
    origin = "the vendored offline Qwen2.5 set of vlmr1-jax" if source == QWEN2_5_DIR else f"copied from {source.name}"
    notes = [f"tokenizer files: {origin}"]
    base_generation = Path(base_model_dir) / GENERATION_CONFIG_FILE if base_model_dir is not None else None
    if base_generation is not None and base_generation.is_file():
        shutil.copyfile(base_generation, folder / GENERATION_CONFIG_FILE)
        notes.append(f"generation_config.json: copied from {base_generation.parent.name}")
    else:
        _write_json(folder / GENERATION_CONFIG_FILE, generation_config(tokenizer))
        notes.append(
            "generation_config.json: vlmr1-jax defaults (no base-model file): greedy, stop at "
            "<|im_end|> or <|endoftext|>"
        )
    notes.append(
        f"preprocessor_config.json: the {cfg.family} processor's defaults ({preprocessor['image_processor_type']})"
    )
    if dtype == "float16":
        notes.append(
            "float16 weights were cast with round-to-nearest-even, not clamped; check activations with "
            "`vlmr1 check-export DIR --target ascend-310p --forward --image IMAGE`"
        )
    (folder / "README.md").write_text(model_card(cfg, target, dtype, card, notes), encoding="utf-8")


def export_hf_folder(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base_model_dir: str | os.PathLike | None = None,
    card: Mapping[str, Any] | None = None,
    **options: Any,
) -> Path:
    """Re-export an HF Qwen2.5-VL folder (e.g. a dtype conversion for Ascend) tensor by tensor, never building
    the model: the release gets the legacy names and flat config; tokenizer and generation config come from
    `base_model_dir` (default: `source`). Peak host memory: about 2.5x the largest tensor plus a constant."""
    cfg = read_config(source)
    tensors = folder_tensors(source, cfg)  # checks names and shapes from the headers before anything is written
    card = {"base_model": Path(source).name, **(card or {})}
    return export_tensors(
        tensors, cfg, out_dir, base_model_dir=source if base_model_dir is None else base_model_dir, card=card, **options
    )
