"""Validate an exported HF Qwen2.5-VL release folder against its own config.json, without torch.

Checks the file set, the flat hub config, every safetensors header (read directly: an 8-byte little-endian length
and a JSON header), the index, the tokenizer, the chat template and the processor config (docs/facts.md: Release files).
`forward_report` adds an optional transformers forward in the release dtype that looks for inf/NaN and measures
how close each layer's activations come to the float16 limit (docs/facts.md: float16); it imports torch
lazily, so nothing else here needs it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from vlmr1_jax.extras import require_torch_extra
from vlmr1_jax.models.qwen2_5_vl.config import Qwen25VLConfig, from_hf_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FP16_MAX = 65504.0
MAX_HEADER_BYTES = 100 * 1024 * 1024
ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"


@dataclasses.dataclass(frozen=True)
class DType:
    """One release dtype under its three names."""

    torch_name: str  # config.json torch_dtype
    safetensors: str  # header dtype
    numpy: Any


DTYPES: dict[str, DType] = {
    "bf16": DType("bfloat16", "BF16", ml_dtypes.bfloat16),
    "fp16": DType("float16", "F16", np.float16),
    "fp32": DType("float32", "F32", np.float32),
}
# Allowed release dtypes per target, the default first. 300I Duo (310P) has no bf16 (docs/facts.md: vllm-ascend).
TARGETS: dict[str, tuple[str, ...]] = {
    "hf": ("bf16", "fp16", "fp32"),
    "ascend-a2": ("bf16", "fp32"),
    "ascend-310p": ("fp16",),
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}
# The special tokens whose ids the processor (tokenizer side) and the model (config side) must agree on.
SPECIAL_TOKEN_FIELDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                        "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                        "vision_token_id": "<|vision_pad|>"}
PROCESSOR_TYPES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast")


def dtype_key(torch_name: str) -> str:
    """'bfloat16' -> 'bf16' (KeyError naming the known ones)."""
    for key, d in DTYPES.items():
        if d.torch_name == torch_name:
            return key
    raise KeyError(f"unknown torch_dtype {torch_name!r}; known: {[d.torch_name for d in DTYPES.values()]}")


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype/shape/data_offsets, plus `__metadata__`)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length {length} is implausible (not a safetensors file?)")
        text = f.read(length)
    if len(text) != length:
        raise ValueError(f"{path}: truncated header ({len(text)} of {length} bytes)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    entry_keys = {"dtype", "shape", "data_offsets"}
    for name, info in header.items():
        if name != "__metadata__" and not (isinstance(info, dict) and entry_keys <= info.keys()):
            raise ValueError(f"{path}: malformed header entry for {name!r}")
    header["__header_bytes__"] = 8 + length
    return header


def hf_shape(path: str, shape: Sequence[int], cfg: Qwen25VLConfig) -> tuple[int, ...]:
    """Shape of our parameter `path` in the HF layout (Linear kernels transposed, patch embed a Conv3d)."""
    if path == "visual.patch_embed":
        v = cfg.vision
        return (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    if path.endswith(".kernel"):
        return tuple(reversed(tuple(shape)))
    return tuple(shape)


def expected_tensors(cfg: Qwen25VLConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a release of `cfg`, from our model definition and the converter's name table."""
    from flax import nnx

    from converters.hf import hf_entries
    from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL

    abstract = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    return {name: hf_shape(path, shape, cfg) for name, path, _, shape in hf_entries(nnx.state(abstract, nnx.Param))}


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


def _config_problems(folder: Path, target: str) -> tuple[Qwen25VLConfig | None, str | None, list[str]]:
    """(parsed config, dtype key the tensors must have, problems) for config.json."""
    problems: list[str] = []
    raw = _read_json(folder / "config.json", problems)
    if raw is None:
        return None, None, problems
    try:
        cfg = from_hf_config(raw)
    except (KeyError, ValueError, TypeError) as e:
        return None, None, [f"config.json: not a Qwen2.5-VL config ({e})"]
    if ARCHITECTURE not in (raw.get("architectures") or []):
        problems.append(f"config.json: architectures {raw.get('architectures')} lacks {ARCHITECTURE!r}")
    if "mrope_section" not in (raw.get("rope_scaling") or {}):
        problems.append("config.json: no top-level rope_scaling.mrope_section (not the flat hub layout that "
                        "transformers 4.x and older vLLM read)")
    vision = raw.get("vision_config") or {}
    floats = [k for k in ("depth", "hidden_size", "num_heads", "patch_size", "spatial_merge_size", "window_size",
                          "tokens_per_second", "temporal_patch_size") if isinstance(vision.get(k), float)]
    if floats:
        problems.append(f"config.json: vision_config {', '.join(floats)} must be integers (transformers 5.x's "
                        f"strict config validation refuses floats)")
    torch_dtype = raw.get("torch_dtype")
    if torch_dtype is None:
        problems.append("config.json: no torch_dtype")
        return cfg, None, problems
    if raw.get("dtype", torch_dtype) != torch_dtype:
        problems.append(f"config.json: dtype {raw['dtype']!r} disagrees with torch_dtype {torch_dtype!r}")
    allowed = [DTYPES[k].torch_name for k in TARGETS[target]]
    if torch_dtype not in allowed:
        problems.append(f"config.json: torch_dtype {torch_dtype!r} is not allowed for target {target} "
                        f"(allowed: {', '.join(allowed)})")
        return cfg, TARGETS[target][0], problems  # the tensors are then held to the target's default dtype
    return cfg, dtype_key(torch_dtype), problems


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
        problems.append(f"{path.name}: __metadata__ is {header.get('__metadata__')}, expected {{'format': 'pt'}} "
                        f"(transformers 4.x refuses other formats)")
    spans = []
    for name, info in header.items():
        if name.startswith("__"):
            continue
        begin, end = info["data_offsets"]
        size = ITEMSIZE.get(info["dtype"])
        if size is not None and end - begin != int(np.prod(info["shape"], dtype=np.int64)) * size:
            problems.append(f"{path.name}: tensor {name} spans {end - begin} bytes, but {info['dtype']} "
                            f"{info['shape']} needs {int(np.prod(info['shape'])) * size}")
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
        problems.append(f"{path.name}: file has {actual} bytes, header describes "
                        f"{header['__header_bytes__'] + position} (truncated or padded)")
    return problems


def _weight_problems(folder: Path, cfg: Qwen25VLConfig, dtype: str | None) -> list[str]:
    """Shards, index, key names, shapes and dtypes against the config (and the release dtype)."""
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
    expected = expected_tensors(cfg)
    missing = [n for n in expected if n not in found and n not in unread]
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    extra = [n for n in found if n not in expected]
    if "lm_head.weight" in extra and cfg.text.tie_word_embeddings:
        extra.remove("lm_head.weight")
        problems.append("lm_head.weight present although tie_word_embeddings is true (hub releases omit it)")
    if extra:
        problems.append(f"unexpected tensors (not part of this config's Qwen2.5-VL): {_listing(extra)}")
    shapes = [f"{n} {tuple(found[n]['shape'])} (expected {expected[n]})" for n in expected
              if n in found and tuple(found[n]["shape"]) != expected[n]]
    if shapes:
        problems.append(f"wrong shapes: {_listing(shapes)}")
    if dtype is not None:
        want = DTYPES[dtype].safetensors
        wrong: dict[str, list[str]] = {}
        for name, info in found.items():
            if info["dtype"] != want:
                wrong.setdefault(info["dtype"], []).append(name)
        for got, names in sorted(wrong.items()):
            problems.append(f"{len(names)} tensors are {got}, expected {want} ({DTYPES[dtype].torch_name}): "
                            f"{_listing(names)}")
    return problems


def _tokenizer_problems(folder: Path, cfg: Qwen25VLConfig) -> list[str]:
    """The tokenizer loads, the chat template renders an image turn, and ids agree with config/generation config."""
    from vlmr1_jax.processing.tokenizer import Tokenizer

    problems: list[str] = []
    if not (folder / "tokenizer.json").is_file() and not (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        problems.append("tokenizer: needs tokenizer.json or vocab.json + merges.txt")
    if not (folder / "chat_template.json").is_file() and not (folder / "chat_template.jinja").is_file():
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
    if "<|vision_start|><|image_pad|><|vision_end|>" not in text or not text.endswith("<|im_start|>assistant\n"):
        problems.append(f"chat template renders an image turn unexpectedly: {text!r}")
    for field, token in SPECIAL_TOKEN_FIELDS.items():
        try:
            token_id = tokenizer.token_to_id(token)
        except KeyError:
            problems.append(f"tokenizer lacks {token}")
            continue
        if token_id != getattr(cfg, field):
            problems.append(f"config.json {field} is {getattr(cfg, field)} but the tokenizer's {token} is "
                            f"{token_id}")
    if tokenizer.vocab_size > cfg.text.vocab_size:
        problems.append(f"tokenizer has {tokenizer.vocab_size} ids but config vocab_size is {cfg.text.vocab_size}")
    generation = _read_json(folder / "generation_config.json", problems)
    if generation is not None:
        eos = generation.get("eos_token_id")
        eos = set(eos if isinstance(eos, list) else [eos])
        try:
            im_end = tokenizer.token_to_id(tokenizer.config.get("eos_token") or "<|im_end|>")
            if im_end not in eos:
                problems.append(f"generation_config.json eos_token_id {sorted(eos, key=str)} lacks the "
                                f"tokenizer's eos {im_end}: generation would not stop at the end of a turn")
        except KeyError as e:
            problems.append(f"tokenizer: {e.args[0]}")
    return problems


def _processor_problems(folder: Path, cfg: Qwen25VLConfig) -> list[str]:
    problems: list[str] = []
    pre = _read_json(folder / "preprocessor_config.json", problems)
    if pre is None:
        return problems
    if pre.get("image_processor_type") not in PROCESSOR_TYPES:
        problems.append(f"preprocessor_config.json: image_processor_type {pre.get('image_processor_type')!r}, "
                        f"expected one of {PROCESSOR_TYPES}")
    v = cfg.vision
    for key, want in (("patch_size", v.patch_size), ("temporal_patch_size", v.temporal_patch_size),
                      ("merge_size", v.spatial_merge_size)):
        if pre.get(key) != want:
            problems.append(f"preprocessor_config.json: {key} {pre.get(key)} != config's {want}")
    lo, hi = pre.get("min_pixels"), pre.get("max_pixels")
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 < lo <= hi):
        problems.append(f"preprocessor_config.json: min_pixels {lo} / max_pixels {hi} must be 0 < min <= max")
    for key in ("image_mean", "image_std"):
        if len(pre.get(key) or []) != v.in_channels:
            problems.append(f"preprocessor_config.json: {key} needs {v.in_channels} values")
    return problems


def nonfinite_problems(model_dir: str | os.PathLike) -> list[str]:
    """One problem per tensor of the folder holding inf / NaN values, reading one tensor at a time."""
    from converters.hf import stored_tensors

    problems = []
    for stored in stored_tensors(model_dir).values():
        try:
            stored.read()
        except ValueError as e:
            problems.append(str(e))
    return problems


def check_export(model_dir: str | os.PathLike, target: str) -> list[str]:
    """Every problem found in a release folder for `target` ("hf", "ascend-a2", "ascend-310p"); [] if none."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {sorted(TARGETS)}")
    folder = Path(model_dir)
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    cfg, dtype, problems = _config_problems(folder, target)
    if cfg is None:
        return problems
    return (problems + _weight_problems(folder, cfg, dtype) + _tokenizer_problems(folder, cfg)
            + _processor_problems(folder, cfg))


# ---- optional forward in the release dtype (torch) ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LayerStat:
    name: str
    max_abs: float  # largest finite |activation|
    nonfinite: int  # count of inf/NaN outputs


@dataclasses.dataclass(frozen=True)
class ForwardReport:
    dtype: str
    layers: list[LayerStat]

    def problems(self) -> list[str]:
        """inf/NaN anywhere, or (in float16) activations at the float16 limit."""
        out = []
        bad = [s for s in self.layers if s.nonfinite]
        if bad:
            out.append(f"{self.dtype} forward: inf/NaN activations, first in {bad[0].name} "
                       f"({len(bad)} of {len(self.layers)} layers affected)")
        if self.dtype == "float16":
            hot = [s for s in self.layers if s.max_abs >= FP16_MAX]
            if hot and not bad:
                out.append(f"float16 forward: activations reach the float16 limit {FP16_MAX:g} in {hot[0].name}")
        return out

    def lines(self) -> list[str]:
        """One line per layer: the largest activation and its share of the float16 limit."""
        return [f"{s.name:<28} max|x| {s.max_abs:>12.4g}  {100 * s.max_abs / FP16_MAX:6.2f}% of fp16 max"
                + (f"  {s.nonfinite} inf/NaN" if s.nonfinite else "") for s in self.layers]


def synthetic_image(size: int = 224, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 RGB image (gradients plus noise) for forward checks when no real image is given."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    base = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                     np.full((size, size), 128.0)], axis=-1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def forward_report(model_dir: str | os.PathLike, dtype: str | None = None, image: str | os.PathLike | None = None,
                   max_pixels: int = 448 * 448) -> ForwardReport:
    """Run transformers' Qwen2.5-VL on CPU in `dtype` (default: the config's torch_dtype) on one image prompt,
    recording the largest |activation| and inf/NaN count of every vision block, the merger, every decoder layer
    and the logits. Random-looking inputs can miss overflows that real images trigger: pass a real `image`."""
    require_torch_extra("the forward check (check-export --forward)")
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # a stray torch-npu must not break `import torch`
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlmr1_jax.processing.image import load_image, preprocess_image

    folder = Path(model_dir)
    raw = json.loads((folder / "config.json").read_text())
    torch_dtype = dtype or raw.get("torch_dtype", "float32")
    cfg = from_hf_config(raw)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, torch_dtype),
                                                               attn_implementation="eager").eval()
    pixels, grid = preprocess_image(load_image(image) if image else synthetic_image(), min_pixels=3136,
                                    max_pixels=max_pixels)
    n_image = int(np.prod(grid)) // cfg.vision.merge_unit
    text = [t for t in range(min(cfg.text.vocab_size, 100)) if t not in
            {getattr(cfg, f) for f in SPECIAL_TOKEN_FIELDS}][:8]
    ids = torch.tensor([[cfg.vision_start_token_id] + [cfg.image_token_id] * n_image + [cfg.vision_end_token_id]
                        + text])
    stats: dict[str, LayerStat] = {}

    def record(name: str):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
            values = out.detach().float()
            finite = torch.isfinite(values)
            peak = float(values[finite].abs().max()) if finite.any() else float("inf")
            stats[name] = LayerStat(name, peak, int((~finite).sum()))
        return hook

    core = model.model
    modules = [(f"visual.blocks.{i}", b) for i, b in enumerate(core.visual.blocks)]
    modules += [("visual.merger", core.visual.merger)]
    modules += [(f"model.layers.{i}", layer) for i, layer in enumerate(core.language_model.layers)]
    modules += [("model.norm", core.language_model.norm), ("lm_head", model.lm_head)]
    handles = [m.register_forward_hook(record(name)) for name, m in modules]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values=torch.from_numpy(pixels).to(getattr(torch, torch_dtype)),
                  image_grid_thw=torch.tensor([grid]),
                  mm_token_type_ids=(ids == cfg.image_token_id).long())  # else 5.x silently uses 1-D positions
    finally:
        for h in handles:
            h.remove()
    return ForwardReport(torch_dtype, [stats[name] for name, _ in modules if name in stats])
