"""Run configuration: frozen dataclasses, loaded from YAML recipes with `section.key=value` overrides.

Batch sizes are stated in prompts and samples (`data.prompts_per_step` prompts x `grpo.num_generations` samples),
not VLM-R1's per-device completions (docs/facts.md: VLM-R1 training).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; -1 on one axis means "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    greedy: bool = False


class Algorithm(NamedTuple):
    """The three choices that make a GRPO variant (registered names or 'package.module:function' paths; the
    registries are in rl/grpo.py)."""

    advantage_estimator: str
    objective: str
    aggregation: str


# `grpo.loss` names. They keep the results of the losses they replace: `dr_grpo` changes the aggregation only, as
# VLM-R1's loss_type does; the full Dr.GRPO recipe adds `advantage_estimator=dr_grpo`.
LOSS_PRESETS: dict[str, Algorithm] = {
    "grpo": Algorithm("grpo", "ppo_clip", "seq_mean_token_mean"),
    "dapo": Algorithm("grpo", "ppo_clip", "token_mean"),
    "dr_grpo": Algorithm("grpo", "ppo_clip", "token_sum_norm"),
    "gspo": Algorithm("grpo", "gspo", "seq_mean_token_mean"),
}


INIT_SCHEMES = ("hf", "fan_in")  # model.init: how a preset's random weights are drawn


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # The model family (models/family.py) of a preset; an HF folder's family comes from its config.json.
    family: str = "qwen2_5_vl"
    # A name from the family's presets (random init), used when hf_model is unset; recipes for real checkpoints set
    # null, so a forgotten model.hf_model is an error instead of a random model.
    preset: str | None = "tiny"
    hf_model: str | None = None  # HF folder to start from (weights, config, tokenizer)
    tokenizer: str | None = None  # tokenizer folder; default: hf_model's, else the vendored Qwen2.5 one
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (every parameter is cast to it at use)
    param_dtype: str = "float32"  # storage of trained parameters (AdamW's master weights): float32 for training
    # Storage of the frozen parts (reference policy, frozen vision tower, LoRA base); null = param_dtype.
    frozen_dtype: str | None = None
    remat: str = "none"  # none | full | dots (per decoder layer)
    # Run the stacked vision blocks / decoder layers with lax.scan (compile time independent of depth) or unrolled
    # (same parameters and results; can be faster to run on small models).
    scan_layers: bool = True
    # Completion positions whose vocabulary logits a train step holds at once ([rows, chunk, vocab] float32).
    logits_chunk: int = 256
    overrides: dict = dataclasses.field(default_factory=dict)  # preset field overrides, e.g. {"text.vocab_size": 512}
    # How a preset's random weights are drawn: "hf" (every weight normal with std 0.02, as transformers initialises)
    # or "fan_in" (linear kernels with std 1/sqrt(fan_in): trains small models from scratch much faster). Unused
    # with hf_model.
    init: str = "hf"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    data_file_paths: str = ""  # colon-separated jsonl files (VLM-R1 format)
    image_folders: str = ""  # colon-separated, one per data file
    reward_method: str | None = None  # colon-separated accu_reward_method per file
    task_type: str | None = "rec"  # question template: rec | ic | odLength | default
    # Unique prompts per optimizer step (all processes together), sampled as optim.grad_accum micro-batches of
    # prompts_per_step / grad_accum prompts; with grpo.num_iterations > 1 they serve that many optimizer steps.
    prompts_per_step: int = 8
    num_epochs: int | None = None  # None = repeat until max_steps
    seed: int = 42
    min_pixels: int = 3136  # the processor resizes every image to within [min_pixels, max_pixels]
    # The resized image's area bound, which, not the file's size, bounds what reaches the model; null: the family's
    # default (Qwen: 12845056, 16384 image tokens; InternVL: 12 tiles of 448 px, VLM-R1's max_anyres_num).
    max_pixels: int | None = None
    # Cap on an ORIGINAL image's pixels, read from its header at load time before any decode: 50 MP keeps 48-50 MP
    # photos and refuses a 60 MP image or a decompression bomb with the line that names it.
    max_image_pixels: int = 50_000_000
    # raise | skip: bad lines, solutions and images (missing, undecodable, truncated, over max_image_pixels, aspect
    # ratio > 200) are found at load time; skipped samples are counted and reported.
    on_error: str = "raise"
    max_prompt_length: int | None = None  # pad prompts to this length (None: bucket per batch)
    # Fraction of the samples (all files together) held out for validation, never trained on: the first
    # ceil(ratio * n) of a permutation seeded by data.seed (VLM-R1's train_test_split). 0: no split.
    val_split_ratio: float = 0.0


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    num_generations: int = 8
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss: str = "grpo"  # a preset of the three parts below: grpo | dapo | dr_grpo | gspo (docs/grpo.md)
    # Each overrides the preset's part when set: a registered name or a user 'package.module:function'.
    advantage_estimator: str | None = None  # grpo | dr_grpo | rloo
    objective: str | None = None  # ppo_clip | gspo
    aggregation: str | None = None  # seq_mean_token_mean | token_mean | token_sum_norm
    # mu, optimizer steps per rollout (VLM-R1's num_iterations): each rollout phase samples data.prompts_per_step
    # prompts (one rollout per accumulation micro-batch) and makes mu updates on them, the sampling policy's
    # log-probs as the old policy. train.max_steps counts optimizer steps, so it must be a multiple of mu.
    num_iterations: int = 1
    # VLM-R1's flag, kept for old recipes: false selects the dr_grpo estimator (r - mean, no std scaling), so it
    # cannot be combined with another advantage_estimator.
    scale_rewards: bool = True
    reward_funcs: tuple[str, ...] = ("accuracy", "format")
    # Keyword options per reward, keyed as in reward_funcs: {length: {count: tokens}, rec_iou: {rescale: false}}.
    # Checked against each function's parameters before any data or model is loaded (docs/rewards.md).
    reward_options: dict = dataclasses.field(default_factory=dict)

    def algorithm(self) -> Algorithm:
        """The preset `loss` with the explicitly set parts (and `scale_rewards=false`) applied."""
        preset = LOSS_PRESETS[self.loss]
        unscaled = None if self.scale_rewards else "dr_grpo"
        return Algorithm(
            self.advantage_estimator or unscaled or preset.advantage_estimator,
            self.objective or preset.objective,
            self.aggregation or preset.aggregation,
        )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-6
    schedule: str = "linear"  # linear (decay to 0) | constant
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    # Micro-batches per optimizer update (VLM-R1's gradient_accumulation_steps): the update takes the mean gradient
    # of grad_accum micro-batches of data.prompts_per_step / grad_accum prompts each.
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    # The assistant text trained on; "{answer}" is the sample's answer (its solution without <answer> tags).
    target_template: str = "<answer> {answer} </answer>"
    max_target_length: int = 64  # answer tokens (incl. <|im_end|>) are padded / must fit to this


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.05


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/default"
    max_steps: int = 100  # optimizer steps (VLM-R1's max_steps); <= 0: data.num_epochs epochs of them
    trainable: str = "full"  # full | freeze_vision | lora
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    rollout_log: bool = False  # write prompts, completions and rewards per step (VLM-R1's DEBUG_MODE log)
    distributed: bool = False  # call jax.distributed.initialize() first
    # Steps whose loss / gradient is not finite are skipped (parameters untouched); this many in a row stop the run.
    max_nonfinite_steps: int = 3
    # Every this many steps, and at the last step, decode the validation split greedily and log eval/* metrics
    # (needs data.val_split_ratio > 0). 0: never.
    eval_every: int = 0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML / command-line value to the field's annotated type, with an error naming the field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args or hint is Any:
            return None
        raise ValueError(f"{where}: null is not allowed")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(v, args[0], where) for v in items)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}") from None
    if hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{where}.{key}" if where else key)  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(value, hint, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def flatten_overrides(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`model.overrides` in either form config files use, {"text.vocab_size": 512} or {"text": {"vocab_size": 512}},
    as dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_overrides(value, name + "."))
        else:
            flat[name] = value
    return flat


# Closed choices a recipe can name, checked when the config is read (before any model is built or compiled).
TASK_TYPES = ("rec", "ic", "odLength", "default", "gui", "math")  # gui / math use the default template
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _check(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{field}={value!r}: expected {expected}")


def _positive(value: float) -> bool:
    return value > 0 and math.isfinite(value)


def _check_grpo_algorithm(g: GRPOConfig) -> None:
    """The loss preset and the scale_rewards rule; the parts' names are checked against their registries by
    `rl.grpo.check_algorithm` when a trainer starts (before any compile)."""
    _check(g.loss in LOSS_PRESETS, "grpo.loss", g.loss, f"one of {sorted(LOSS_PRESETS)}")
    _check(
        g.scale_rewards or g.advantage_estimator in (None, "dr_grpo"),
        "grpo.scale_rewards",
        g.scale_rewards,
        f"true with grpo.advantage_estimator={g.advantage_estimator!r} (false means the dr_grpo estimator)",
    )


def validate(cfg: RunConfig) -> RunConfig:
    """Range and choice checks of every field whose nonsense value would otherwise fail deep inside a run (or train
    silently); the error names the field. Returns `cfg` with `model.overrides` flattened."""
    m, d, s, g, o, lo, t = cfg.model, cfg.data, cfg.sampling, cfg.grpo, cfg.optim, cfg.lora, cfg.train
    for field, value in (
        ("model.dtype", m.dtype),
        ("model.param_dtype", m.param_dtype),
        ("model.frozen_dtype", m.frozen_dtype or m.param_dtype),
    ):
        _check(value in DTYPE_NAMES, field, value, f"one of {DTYPE_NAMES}")
    _check(m.remat in ("none", "full", "dots"), "model.remat", m.remat, "none, full or dots")
    _check(m.init in INIT_SCHEMES, "model.init", m.init, f"one of {INIT_SCHEMES}")
    _check(m.logits_chunk >= 1, "model.logits_chunk", m.logits_chunk, "an integer >= 1")
    custom = d.task_type is not None and "{Question}" in d.task_type
    _check(
        d.task_type is None or custom or d.task_type in TASK_TYPES,
        "data.task_type",
        d.task_type,
        f"one of {TASK_TYPES} or a template containing {{Question}}",
    )
    _check(d.prompts_per_step >= 1, "data.prompts_per_step", d.prompts_per_step, "an integer >= 1")
    _check(d.num_epochs is None or d.num_epochs >= 1, "data.num_epochs", d.num_epochs, "null or >= 1")
    _check(d.min_pixels >= 1, "data.min_pixels", d.min_pixels, ">= 1")
    _check(
        d.max_pixels is None or d.max_pixels >= d.min_pixels,
        "data.max_pixels",
        d.max_pixels,
        f"null or >= data.min_pixels ({d.min_pixels})",
    )
    _check(d.max_image_pixels >= 1, "data.max_image_pixels", d.max_image_pixels, ">= 1")
    _check(d.on_error in ("raise", "skip"), "data.on_error", d.on_error, "raise or skip")
    _check(
        d.max_prompt_length is None or d.max_prompt_length >= 1,
        "data.max_prompt_length",
        d.max_prompt_length,
        "null or >= 1",
    )
    _check(0 <= d.val_split_ratio < 1, "data.val_split_ratio", d.val_split_ratio, "a fraction in [0, 1)")
    _check(s.max_new_tokens >= 1, "sampling.max_new_tokens", s.max_new_tokens, "an integer >= 1")
    _check(
        s.greedy or _positive(s.temperature),
        "sampling.temperature",
        s.temperature,
        "> 0 (for greedy decoding set sampling.greedy=true)",
    )
    _check(s.top_k >= 0, "sampling.top_k", s.top_k, ">= 0 (0 disables)")
    _check(0 < s.top_p <= 1, "sampling.top_p", s.top_p, "in (0, 1]")
    _check(g.num_generations >= 1, "grpo.num_generations", g.num_generations, ">= 1 (GRPO needs >= 2)")
    _check(g.num_iterations >= 1, "grpo.num_iterations", g.num_iterations, "an integer >= 1")
    _check(g.beta >= 0 and math.isfinite(g.beta), "grpo.beta", g.beta, ">= 0 (0: no reference model)")
    _check(_positive(g.epsilon), "grpo.epsilon", g.epsilon, "> 0")
    _check(g.epsilon_high is None or _positive(g.epsilon_high), "grpo.epsilon_high", g.epsilon_high, "null or > 0")
    _check(len(g.reward_funcs) >= 1, "grpo.reward_funcs", g.reward_funcs, "at least one reward")
    _check_grpo_algorithm(g)
    _check(
        o.learning_rate >= 0 and math.isfinite(o.learning_rate),
        "optim.learning_rate",
        o.learning_rate,
        "a finite value >= 0",
    )
    _check(o.schedule in ("linear", "constant"), "optim.schedule", o.schedule, "linear or constant")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    _check(0 <= o.b1 < 1, "optim.b1", o.b1, "in [0, 1)")
    _check(0 <= o.b2 < 1, "optim.b2", o.b2, "in [0, 1)")
    _check(_positive(o.eps), "optim.eps", o.eps, "> 0")
    _check(_positive(o.max_grad_norm), "optim.max_grad_norm", o.max_grad_norm, "> 0")
    _check(o.grad_accum >= 1, "optim.grad_accum", o.grad_accum, "an integer >= 1")
    _check(
        d.prompts_per_step % o.grad_accum == 0,
        "data.prompts_per_step",
        d.prompts_per_step,
        f"a multiple of optim.grad_accum={o.grad_accum} (an optimizer step is grad_accum micro-batches of "
        f"prompts_per_step / grad_accum prompts)",
    )
    _check(lo.rank >= 1, "lora.rank", lo.rank, ">= 1")
    _check(_positive(lo.alpha), "lora.alpha", lo.alpha, "> 0")
    _check(0 <= lo.dropout < 1, "lora.dropout", lo.dropout, "in [0, 1)")
    _check(cfg.sft.max_target_length >= 1, "sft.max_target_length", cfg.sft.max_target_length, ">= 1")
    _check(
        t.trainable in ("full", "freeze_vision", "lora"), "train.trainable", t.trainable, "full, freeze_vision or lora"
    )
    for field in ("save_every", "keep_checkpoints", "log_every", "max_nonfinite_steps"):
        _check(getattr(t, field) >= 1, f"train.{field}", getattr(t, field), "an integer >= 1")
    _check(t.eval_every >= 0, "train.eval_every", t.eval_every, "an integer >= 0 (0: no evaluation)")
    _check(
        t.eval_every == 0 or d.val_split_ratio > 0,
        "train.eval_every",
        t.eval_every,
        "0 without a validation split (set data.val_split_ratio, e.g. 0.05, to hold out samples to evaluate on)",
    )
    for field in ("data", "fsdp", "tensor"):
        size = getattr(cfg.mesh, field)
        _check(size >= 1 or size == -1, f"mesh.{field}", size, ">= 1, or -1 for all remaining devices")
    return dataclasses.replace(cfg, model=dataclasses.replace(m, overrides=flatten_overrides(m.overrides)))


def from_dict(data: dict[str, Any]) -> RunConfig:
    """A RunConfig from its `to_dict` form (e.g. checkpoint metadata), validated like a recipe."""
    return validate(_build(RunConfig, data, ""))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`section.key=value` strings on top of a raw YAML dict (values parsed as YAML scalars)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r}: expected section.key=value")
        section, _, field = key.partition(".")
        node = raw.setdefault(section, {})
        *parents, leaf = field.split(".")
        for parent in parents:  # nested mappings such as model.overrides.text.vocab_size
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(text)
    return raw


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A recipe (a path, or a name in vlmr1_jax/configs) plus overrides -> RunConfig."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            p = CONFIG_DIR / f"{path}.yaml"
        if not p.is_file():
            known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"config {path!r} is neither a file nor a packaged recipe {known}")
        raw = yaml.safe_load(p.read_text()) or {}
    return validate(_build(RunConfig, apply_overrides(raw, overrides), ""))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
