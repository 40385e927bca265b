"""Validate an exported HF Qwen2.5-VL release folder against its own config.json, without torch.

Checks the file set, the flat hub config, every safetensors header (read directly: an 8-byte little-endian length
and a JSON header), the index, the tokenizer, the chat template and the processor config (docs/facts.md: Release
files). The optional transformers forward of `vlmr1 check-export --forward` lives in `ports.forward_report`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converters.targets import TARGETS, check_target
from vlmr1_jax.dtypes import DTYPES
from vlmr1_jax.filenames import (
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    INDEX_FILE,
    PREPROCESSOR_CONFIG_FILE,
    SINGLE_FILE,
)
from vlmr1_jax.models.family import family_for_hf_config, family_of, processor_of
from vlmr1_jax.models.hf_weights import stored_tensors
from vlmr1_jax.models.safetensors_read import ITEMSIZE, read_safetensors_header


def _listing(items: Sequence[str], limit: int = 5) -> str:
    items = sorted(items)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"{path.name}: missing")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path.name}: cannot read JSON ({e})")
    return None


def _config_problems(folder: Path, target: str) -> tuple[Any | None, str | None, list[str]]:
    """(parsed config, canonical dtype the tensors must have, problems) for config.json."""
    problems: list[str] = []
    raw = _read_json(folder / CONFIG_FILE, problems)
    if raw is None:
        return None, None, problems
    try:
        family = family_for_hf_config(raw)
    except ValueError as e:
        return None, None, [str(e)]
    try:
        cfg = family.from_hf_config(raw)
    except (KeyError, ValueError, TypeError) as e:
        return None, None, [f"config.json: not a {family.name} config ({e})"]
    problems += family.hf_config_problems(raw)
    torch_dtype = raw.get("torch_dtype")
    if torch_dtype is None:
        problems.append("config.json: no torch_dtype")
        return cfg, None, problems
    if raw.get("dtype", torch_dtype) != torch_dtype:
        problems.append(f"config.json: dtype {raw['dtype']!r} disagrees with torch_dtype {torch_dtype!r}")
    allowed = TARGETS[target]
    if torch_dtype not in allowed:
        problems.append(
            f"config.json: torch_dtype {torch_dtype!r} is not allowed for target {target} "
            f"(allowed: {', '.join(allowed)})"
        )
        return cfg, allowed[0], problems  # the tensors are then held to the target's default dtype
    return cfg, torch_dtype, problems


def _weight_files(folder: Path, problems: list[str]) -> tuple[dict[str, str], int | None]:
    """(tensor name -> shard file name, index total_size or None) from the index or the single file."""
    index_path, single = folder / INDEX_FILE, folder / SINGLE_FILE
    if index_path.exists():
        if single.exists():
            problems.append(f"both {INDEX_FILE} and {SINGLE_FILE} present (readers disagree on which to use)")
        index = _read_json(index_path, problems)
        if index is None:
            return {}, None
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            problems.append(f"{INDEX_FILE}: no weight_map")
            return {}, None
        total = (index.get("metadata") or {}).get("total_size")
        if total is None:
            problems.append(f"{INDEX_FILE}: no metadata.total_size")
        return dict(weight_map), total
    if single.exists():
        return {}, None
    problems.append(f"no weights: neither {INDEX_FILE} nor {SINGLE_FILE}")
    return {}, None


def _shard_problems(path: Path, header: dict[str, Any]) -> list[str]:
    """Metadata and byte-layout problems of one shard (offsets contiguous, sizes = shape x itemsize, file size)."""
    problems = []
    if (header.get("__metadata__") or {}).get("format") != "pt":
        problems.append(
            f"{path.name}: __metadata__ is {header.get('__metadata__')}, expected {{'format': 'pt'}} "
            f"(transformers 4.x refuses other formats)"
        )
    spans = []
    for name, info in header.items():
        if name.startswith("__"):
            continue
        begin, end = info["data_offsets"]
        size = ITEMSIZE.get(info["dtype"])
        if size is not None and end - begin != int(np.prod(info["shape"], dtype=np.int64)) * size:
            problems.append(
                f"{path.name}: tensor {name} spans {end - begin} bytes, but {info['dtype']} "
                f"{info['shape']} needs {int(np.prod(info['shape'])) * size}"
            )
        spans.append((begin, end))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            problems.append(f"{path.name}: tensor data not contiguous at byte {position}")
            break
        position = end
    actual = path.stat().st_size
    if header["__header_bytes__"] + position != actual:
        problems.append(
            f"{path.name}: file has {actual} bytes, header describes "
            f"{header['__header_bytes__'] + position} (truncated or padded)"
        )
    return problems


def _weight_problems(folder: Path, cfg: Any, dtype: str | None) -> list[str]:
    """Shards, index, key names, shapes and dtypes against the config (and the canonical release dtype)."""
    problems: list[str] = []
    weight_map, total_size = _weight_files(folder, problems)
    if problems and not weight_map and not (folder / SINGLE_FILE).exists():
        return problems
    shard_names = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
    listed = set(shard_names)
    strays = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in listed)
    if strays:
        problems.append(f"safetensors files not referenced by {INDEX_FILE}: {_listing(strays)}")
    found: dict[str, dict[str, Any]] = {}
    unread: set[str] = set()  # tensors of missing or unreadable shards: reported once, by shard
    for shard in shard_names:
        path = folder / shard
        held = [n for n, f in weight_map.items() if f == shard]
        if not path.is_file():
            problems.append(f"missing shard {shard} (holds {len(held)} tensors, e.g. {_listing(held, 2)})")
            unread.update(held)
            continue
        try:
            header = read_safetensors_header(path)
        except ValueError as e:
            problems.append(str(e))
            unread.update(held)
            continue
        problems += _shard_problems(path, header)
        for name, info in header.items():
            if name.startswith("__"):
                continue
            if weight_map and weight_map.get(name) != shard:
                problems.append(f"{shard}: holds {name}, which {INDEX_FILE} maps to {weight_map.get(name)}")
            found[name] = info
    absent = [n for n in weight_map if n not in found and n not in unread]
    if absent:
        problems.append(f"{INDEX_FILE} lists tensors its shards lack: {_listing(absent)}")
    nbytes = sum(info["data_offsets"][1] - info["data_offsets"][0] for info in found.values())
    if total_size is not None and not unread and total_size != nbytes:
        problems.append(f"{INDEX_FILE}: metadata.total_size {total_size} != {nbytes} bytes of tensor data")
    layout = family_of(cfg).layout
    expected = layout.expected_hf_shapes(cfg)
    missing = [n for n in expected if n not in found and n not in unread]
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    extra = [n for n in found if n not in expected]
    if layout.TIED_HEAD in extra and cfg.text.tie_word_embeddings:
        extra.remove(layout.TIED_HEAD)
        problems.append(f"{layout.TIED_HEAD} present although tie_word_embeddings is true (hub releases omit it)")
    if extra:
        problems.append(f"unexpected tensors (not part of this config's {cfg.family} model): {_listing(extra)}")
    shapes = [
        f"{n} {tuple(found[n]['shape'])} (expected {expected[n]})"
        for n in expected
        if n in found and tuple(found[n]["shape"]) != expected[n]
    ]
    if shapes:
        problems.append(f"wrong shapes: {_listing(shapes)}")
    if dtype is not None:
        want = DTYPES[dtype].safetensors
        wrong: dict[str, list[str]] = {}
        for name, info in found.items():
            if info["dtype"] != want:
                wrong.setdefault(info["dtype"], []).append(name)
        for got, names in sorted(wrong.items()):
            problems.append(f"{len(names)} tensors are {got}, expected {want} ({dtype}): {_listing(names)}")
    return problems


def _tokenizer_problems(folder: Path, cfg: Any) -> list[str]:
    """The tokenizer loads, the chat template renders an image turn, and ids agree with config/generation config."""
    from vlmr1_jax.processing.tokenizer import Tokenizer

    problems: list[str] = []
    if not (folder / "tokenizer.json").is_file() and not (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    ):
        problems.append("tokenizer: needs tokenizer.json or vocab.json + merges.txt")
    if not (folder / CHAT_TEMPLATE_FILE).is_file() and not (folder / "chat_template.jinja").is_file():
        problems.append("chat_template.json missing (the processor and vLLM's /v1/chat/completions read it)")
    try:
        tokenizer = Tokenizer.load(folder)
    except (ValueError, KeyError, OSError) as e:
        return problems + [f"tokenizer does not load: {e}"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 -- jinja2 raises many types for a broken template
        return problems + [f"chat template does not render: {type(e).__name__}: {e}"]
    if not text.endswith("<|im_start|>assistant\n"):
        problems.append(f"chat template does not end an image turn with the assistant's turn: {text!r}")
    processor = processor_of(cfg)
    prompt = processor.render_prompt(tokenizer, "Describe the image.", 1, "{Question}")
    if processor.vision_tokens["image_token_id"] not in prompt:
        problems.append(f"the prompt of an image turn has no image placeholder: {prompt!r}")
    for field, token in processor.vision_tokens.items():
        try:
            token_id = tokenizer.token_to_id(token)
        except KeyError:
            problems.append(f"tokenizer lacks {token}")
            continue
        if token_id != getattr(cfg, field):
            problems.append(f"config.json {field} is {getattr(cfg, field)} but the tokenizer's {token} is {token_id}")
    if tokenizer.vocab_size > cfg.text.vocab_size:
        problems.append(f"tokenizer has {tokenizer.vocab_size} ids but config vocab_size is {cfg.text.vocab_size}")
    generation = _read_json(folder / GENERATION_CONFIG_FILE, problems)
    if generation is not None:
        eos = generation.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [eos])
        try:
            im_end = tokenizer.token_to_id(tokenizer.config.get("eos_token") or "<|im_end|>")
            if im_end not in eos:
                problems.append(
                    f"generation_config.json eos_token_id {sorted(eos, key=str)} lacks the "
                    f"tokenizer's eos {im_end}: generation would not stop at the end of a turn"
                )
        except KeyError as e:
            problems.append(f"tokenizer: {e.args[0]}")
    return problems


def _processor_problems(folder: Path, cfg: Any) -> list[str]:
    problems: list[str] = []
    pre = _read_json(folder / PREPROCESSOR_CONFIG_FILE, problems)
    if pre is None:
        return problems
    processor = processor_of(cfg).hf_preprocessor_config(cfg)["image_processor_type"]
    allowed = (processor, processor + "Fast")  # transformers' slow and fast implementations
    if pre.get("image_processor_type") not in allowed:
        problems.append(
            f"preprocessor_config.json: image_processor_type {pre.get('image_processor_type')!r}, "
            f"expected one of {allowed}"
        )
    return problems + processor_of(cfg).preprocessor_problems(pre, cfg)


def nonfinite_problems(model_dir: str | os.PathLike) -> list[str]:
    """One problem per tensor of the folder holding inf / NaN values, reading one tensor at a time."""
    problems = []
    for stored in stored_tensors(model_dir).values():
        try:
            stored.read()
        except ValueError as e:
            problems.append(str(e))
    return problems


def check_export(model_dir: str | os.PathLike, target: str) -> list[str]:
    """Every problem found in a release folder for `target` ("hf", "ascend-a2", "ascend-310p"); [] if none."""
    check_target(target)
    folder = Path(model_dir)
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    cfg, dtype, problems = _config_problems(folder, target)
    if cfg is None:
        return problems
    return (
        problems
        + _weight_problems(folder, cfg, dtype)
        + _tokenizer_problems(folder, cfg)
        + _processor_problems(folder, cfg)
    )
