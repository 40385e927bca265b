"""Everything a run builds before its first step: mesh, tokenizer, model (preset, HF folder or checkpoint), data,
and the host -> device transfer of prompt batches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from vlmr1_jax.config import ModelConfig, RunConfig
from vlmr1_jax.data.jsonl import Sample, load_jsonl_datasets
from vlmr1_jax.models.family import VisionLanguageModel, family_of, get_family, processor_of
from vlmr1_jax.models.hf_weights import load_hf_model
from vlmr1_jax.models.layers import LoRAParam, rescale_kernels_to_fan_in
from vlmr1_jax.models.processor import Processor, PromptBatch
from vlmr1_jax.parallel.mesh import create_sharded, initialize_distributed, make_mesh, state_shardings
from vlmr1_jax.processing.tokenizer import QWEN2_5_DIR, Tokenizer, qwen2_5_tokenizer
from vlmr1_jax.rl.lora import apply_lora

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str, field: str = "dtype") -> jnp.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"{field}={name!r}: unknown dtype; choose one of {sorted(DTYPES)}") from None


def frozen_dtype_of(model: ModelConfig) -> jnp.dtype:
    """Storage dtype of the frozen parts (reference policy, frozen vision tower, LoRA base): model.frozen_dtype,
    else model.param_dtype."""
    return dtype_of(model.frozen_dtype or model.param_dtype, "model.frozen_dtype")


def check_model_config(cfg: RunConfig) -> None:
    """Refuse, before anything is loaded, a training run without a model source or with half-precision master
    weights (AdamW updates the trained parameters in place: a bf16 update under half an ulp rounds away)."""
    model = cfg.model
    if not model.hf_model and not model.preset:
        raise ValueError(
            "model.hf_model and model.preset are both unset: set model.hf_model=/ckpt/Qwen2.5-VL-3B-"
            "Instruct (the HF folder to train), or model.preset=NAME for a random-init experiment"
        )
    get_family(model.family)  # names model.family and the known families when it is not one
    dtype_of(model.dtype, "model.dtype")
    if dtype_of(model.param_dtype, "model.param_dtype") != jnp.float32:
        raise ValueError(
            f"model.param_dtype={model.param_dtype}: trained parameters are AdamW's master weights, "
            f"and in {model.param_dtype} an update under half an ulp rounds away (at lr 1e-6 most "
            f"weights never move); set model.param_dtype=float32 (compute stays in model.dtype) and "
            f"model.frozen_dtype=bfloat16 to keep the frozen parts in bf16"
        )
    frozen_dtype_of(model)


def setup_mesh(cfg: RunConfig) -> Mesh:
    if cfg.train.distributed:
        initialize_distributed()
    return make_mesh(cfg.mesh)


def tokenizer_dir(cfg: RunConfig) -> Path:
    """model.tokenizer, else the HF model's own tokenizer files, else the vendored Qwen2.5 tokenizer."""
    return Path(cfg.model.tokenizer or cfg.model.hf_model or QWEN2_5_DIR)


def load_tokenizer(cfg: RunConfig) -> Tokenizer:
    path = tokenizer_dir(cfg)
    return qwen2_5_tokenizer() if path == QWEN2_5_DIR else Tokenizer.load(path)


def tokenizer_token_ids(tokenizer: Tokenizer, processor: Processor) -> dict[str, int]:
    """Model config fields that must agree with the tokenizer: the family's vision tokens, its pad and EOS."""
    ids = {field: _token_id(tokenizer, token, "model.tokenizer") for field, token in processor.vision_tokens.items()}
    return {**ids, processor.pad_token_field: tokenizer.pad_id, "eos_token_id": tokenizer.eos_ids[0]}


def _token_id(tokenizer: Tokenizer, token: str, where: str) -> int:
    try:
        return tokenizer.token_to_id(token)
    except KeyError:
        raise ValueError(
            f"{where}: lacks the model's special token {token}; use the model's own tokenizer (model.tokenizer) "
            "or add the family's tokens (Tokenizer.with_special_tokens)"
        ) from None


def preset_config(cfg: RunConfig, tokenizer: Tokenizer) -> Any:
    """A preset with its special token ids (and, for compact tokenizers, its vocabulary) set from the tokenizer."""
    family = get_family(cfg.model.family)
    base = family.get_preset(cfg.model.preset)  # type: ignore[arg-type]  # validated: without hf_model the preset is set
    overrides: dict[str, Any] = dict(tokenizer_token_ids(tokenizer, family.processor))
    if tokenizer.vocab_size > base.text.vocab_size or cfg.model.preset in ("tiny", "demo-s"):
        overrides["text.vocab_size"] = -(-tokenizer.vocab_size // 64) * 64
    overrides.update(cfg.model.overrides)
    return family.with_overrides(base, overrides)


def check_tokenizer_matches(model_cfg: Any, tokenizer: Tokenizer, where: str) -> None:
    if tokenizer.vocab_size > model_cfg.text.vocab_size:
        raise ValueError(
            f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model vocab is {model_cfg.text.vocab_size}"
        )
    for field, token in processor_of(model_cfg).vision_tokens.items():
        token_id = _token_id(tokenizer, token, f"{where}: the tokenizer")
        if getattr(model_cfg, field) != token_id:
            raise ValueError(f"{where}: model {field} {getattr(model_cfg, field)} != tokenizer {token} {token_id}")


def configure_model(model: VisionLanguageModel, cfg: ModelConfig) -> None:
    """Apply the recipe's static program settings (remat, scanned layers, log-prob chunk), which are not
    parameters: every model a run compiles gets them here."""
    model.set_remat(cfg.remat)
    model.set_scan_layers(cfg.scan_layers)
    model.text.logits_chunk = cfg.logits_chunk


def build_model(cfg: RunConfig, tokenizer: Tokenizer, mesh: Mesh) -> VisionLanguageModel:
    """The policy, born sharded over `mesh`: from an HF folder, or a preset's random init (seed train.seed).
    Starting from one of our checkpoints is handled by the trainer (it restores the whole state)."""
    check_model_config(cfg)
    dtype, param_dtype = dtype_of(cfg.model.dtype), dtype_of(cfg.model.param_dtype)
    if cfg.model.hf_model:
        model = load_hf_model(cfg.model.hf_model, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
        where = cfg.model.hf_model
    else:
        model_cfg = preset_config(cfg, tokenizer)
        model = create_sharded(
            lambda: family_of(model_cfg).model_class(
                model_cfg, rngs=nnx.Rngs(cfg.train.seed), dtype=dtype, param_dtype=param_dtype
            ),
            mesh,
        )
        if cfg.model.init == "fan_in":
            rescale_kernels_to_fan_in(model)
        where = f"preset {cfg.model.preset}"
    check_tokenizer_matches(model.cfg, tokenizer, where)
    configure_model(model, cfg.model)
    if cfg.train.trainable == "lora":
        apply_lora(model, cfg.lora.rank, cfg.lora.alpha, seed=cfg.train.seed, dropout=cfg.lora.dropout)
        adapters = nnx.state(model, LoRAParam)  # born on one device: shard them like their kernels
        nnx.update(model, jax.device_put(adapters, state_shardings(adapters, mesh)))
    return model


def load_samples(cfg: RunConfig) -> list[Sample]:
    samples, report = load_jsonl_datasets(
        cfg.data.data_file_paths,
        cfg.data.image_folders,
        cfg.data.reward_method,
        on_error=cfg.data.on_error,  # type: ignore[arg-type]
        max_image_pixels=cfg.data.max_image_pixels,
    )
    if report.problems:
        log.warning("data: %s", report.summary())
    if not samples:
        raise ValueError(f"no usable samples in {cfg.data.data_file_paths!r}")
    return samples


def on_mesh(tree: Any, mesh: Mesh) -> Any:
    """`tree` with its single-device leaves (the step and optimizer counters `jnp.zeros` makes) replicated over
    `mesh`, so the jitted step gets back the shardings it was given (one compile, not two) and a restore target
    built from the state is valid in every process."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x: jax.Array) -> jax.Array:
        if not isinstance(x.sharding, SingleDeviceSharding):
            return x
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, replicated, lambda idx: value[idx])

    return jax.tree.map(place, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array on every process's host (all-gather across processes when needed)."""
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def run_dir(cfg: RunConfig) -> Path:
    path = Path(cfg.train.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def columns_for(
    samples: Sequence[Sample], batch: PromptBatch, repeat: int, processor: Processor, task_type: str | None
) -> dict[str, list[Any]]:
    """Reward keyword columns for G consecutive completions per sample, as VLM-R1 passes its dataset columns.

    Every jsonl field of the samples (`Sample.extra`, None for a sample without a field another sample of the batch
    has), `id`, `accu_reward_method`, the loader's `problem` / `solution` / `image_path`, the processor's
    `image_grid_thw`, `model_image_size` (per image, the [height, width] frame the model's boxes live in, None when
    the family does not rescale) and `prompts`: VLM-R1's conversation for the prompt (the processor's
    `prompt_messages`). The loader refuses jsonl keys that name a derived column (`RESERVED_KEYS`), so no field is
    shadowed.
    """
    fields = list(dict.fromkeys(key for sample in samples for key in sample.extra))
    rows = []
    for sample, grids in zip(samples, batch.image_grids, strict=True):
        row = {
            **{key: sample.extra.get(key) for key in fields},
            "id": sample.id,
            "accu_reward_method": sample.accu_reward_method,
            "problem": sample.problem,
            "solution": sample.solution,
            "image_path": list(sample.image_paths),
            "image_grid_thw": [list(g) for g in grids],
            "model_image_size": [_as_list(processor.model_frame(g)) for g in grids],
            "prompts": processor.prompt_messages(sample.problem, len(sample.image_paths), task_type),
        }
        rows += [row] * repeat
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def _as_list(frame: tuple[int, int] | None) -> list[int] | None:
    return None if frame is None else list(frame)


def resolve_max_steps(cfg: RunConfig, num_samples: int, updates_per_rollout: int = 1) -> int:
    """The run's length in optimizer steps: train.max_steps, or (when it is <= 0) data.num_epochs epochs of prompt
    batches, each used for `updates_per_rollout` steps (GRPO's num_iterations; a run ends on a whole rollout)."""
    if cfg.train.max_steps > 0:
        if cfg.train.max_steps % updates_per_rollout:
            raise ValueError(
                f"train.max_steps={cfg.train.max_steps}: expected a multiple of grpo.num_iterations="
                f"{updates_per_rollout} (each rollout is used for num_iterations optimizer steps)"
            )
        return cfg.train.max_steps
    if not cfg.data.num_epochs:
        raise ValueError("train.max_steps <= 0 needs data.num_epochs to define the run length")
    steps = (num_samples // cfg.data.prompts_per_step) * cfg.data.num_epochs
    if steps <= 0:
        raise ValueError(
            f"{num_samples} samples make no full batch of data.prompts_per_step={cfg.data.prompts_per_step}"
        )
    return steps * updates_per_rollout
