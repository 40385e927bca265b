"""`vlmr1 plan`: does a recipe fit a device before anyone rents it? Ahead-of-time compile the GRPO trainer's three
jitted programs (grouped sampler, reference log-probs, GRPO step) for the recipe's model, batch and lengths on a
simulated mesh of N CPU devices, with abstract inputs carrying the real shardings (nothing is allocated), and report
per-device memory, FLOPs, compile times and a fit verdict.

Per-device numbers: `memory_analysis()` of an SPMD-partitioned program describes the program one device runs (its
argument bytes equal the addressable shard bytes of one device; `tests/test_plan.py` checks it). Argument and state
bytes are exact for any backend; temporaries depend on the backend's fusion and layouts (docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlmr1_jax.config import RunConfig
from vlmr1_jax.models.family import family_of, processor_of
from vlmr1_jax.models.hf_weights import read_config
from vlmr1_jax.models.processor import PromptBatch, max_pixels_or_default
from vlmr1_jax.parallel.mesh import logical_to_spec, make_mesh
from vlmr1_jax.processing.batch import encode_prompts
from vlmr1_jax.processing.tokenizer import Tokenizer, qwen2_5_tokenizer
from vlmr1_jax.rl.lora import apply_lora
from vlmr1_jax.rl.rollout import TrainExample
from vlmr1_jax.rl.state import TrainState, init_train_state, make_optimizer
from vlmr1_jax.rl.step import make_grpo_step, make_logprob_fn
from vlmr1_jax.train.setup import configure_model, dtype_of, frozen_dtype_of, preset_config

log = logging.getLogger(__name__)

GIB = 1024**3

# HBM per JAX device (one chip; a v5p chip's two TensorCores are one device). 910b: Ascend 910B2/B3.
DEVICE_HBM_GIB: dict[str, float] = {"v5e": 16, "v5p": 95, "v6e": 32, "h100": 80, "h200": 141, "910b": 64}
HEADROOM = 0.9  # fits when the peak is at most this fraction of HBM (allocator fragmentation, runtime buffers)
DEFAULT_IMAGE_SIZE = (640, 480)  # width x height: a typical COCO image, the source of RefCOCO/+/g
# A representative RefCOCO referring expression; the image tokens dominate the prompt length anyway.
REPRESENTATIVE_PROBLEM = "the man in the blue shirt standing on the left"
# The simulated programs never run: skip LLVM's optimisations (memory_analysis is unchanged, compiles are faster).
FAST_COMPILE = "--xla_backend_optimization_level=0"
EXIT_DOES_NOT_FIT = 3  # exit status when the plan does not fit (0 when it does), for scripts and CI


# ------------------------------------------------------------------------------------------- simulated devices


def cpu_devices(count: int) -> list[jax.Device] | None:
    """`count` CPU devices for the simulated mesh, configuring JAX's CPU client when it has not started yet;
    None when JAX already runs with fewer (the caller re-executes in a fresh process)."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)
    devices = jax.devices("cpu")
    return devices[:count] if len(devices) >= count else None


# ------------------------------------------------------------------------------------------- abstract inputs


def model_config(cfg: RunConfig, tokenizer: Tokenizer) -> Any:
    """The architecture `build_model` would build: model.hf_model's config.json (no weights read), else the preset."""
    if cfg.model.hf_model:
        return read_config(cfg.model.hf_model)
    if not cfg.model.preset:
        raise ValueError(
            "vlmr1 plan needs an architecture: set model.hf_model=FOLDER (only its config.json is "
            "read) or model.preset=NAME (e.g. model.preset=qwen2.5-vl-3b)"
        )
    return preset_config(cfg, tokenizer)


def plan_tokenizer(cfg: RunConfig) -> Tokenizer:
    """The run's tokenizer; an HF folder holding only config.json falls back to the vendored Qwen2.5 one (the
    special ids and prompt lengths are the same for the released models)."""
    folder = cfg.model.tokenizer or cfg.model.hf_model
    if folder and any((Path(folder) / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return Tokenizer.load(folder)
    if cfg.model.tokenizer:
        raise FileNotFoundError(f"model.tokenizer={folder}: no tokenizer.json or vocab.json there")
    return qwen2_5_tokenizer()


def with_shardings(tree: Any, mesh: Mesh) -> Any:
    """ShapeDtypeStructs of an abstract train state with the shardings the trainer gives them: model parameters
    and LoRA adapters are sharded by their logical axes (`create_sharded`, `load_hf_model`, `build_model`), and so
    are the optimizer moments and reference copies made from them; scalar counters are replicated by `on_mesh`."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(leaf):
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            axes = leaf.get_metadata().get("logical_axes") or (None,) * len(value.shape)
            spec = logical_to_spec(axes, value.shape, mesh)
            return leaf.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec)))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)

    return jax.tree.map(place, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_train_state(cfg: RunConfig, model_cfg: Any, mesh: Mesh, optimizer) -> tuple[nnx.GraphDef, TrainState]:
    """The trainer's (graphdef, TrainState) as sharded ShapeDtypeStructs: the real model constructor, LoRA and
    `init_train_state` traced under `jax.eval_shape`, so no parameter is ever allocated."""
    dtype, param_dtype = dtype_of(cfg.model.dtype), dtype_of(cfg.model.param_dtype)
    graphdefs = []

    def build() -> TrainState:
        model = family_of(model_cfg).model_class(
            model_cfg, rngs=nnx.Rngs(cfg.train.seed), dtype=dtype, param_dtype=param_dtype
        )
        configure_model(model, cfg.model)
        if cfg.train.trainable == "lora":
            apply_lora(model, cfg.lora.rank, cfg.lora.alpha, seed=cfg.train.seed, dropout=cfg.lora.dropout)
        graphdef, state = init_train_state(
            model, cfg.train.trainable, optimizer, cfg.grpo.beta > 0, frozen_dtype=frozen_dtype_of(cfg.model)
        )
        graphdefs.append(graphdef)
        return state

    state = jax.eval_shape(build)
    return graphdefs[0], with_shardings(state, mesh)


def parse_image_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480) (width x height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--image-size {text!r}: expected WIDTHxHEIGHT, e.g. 640x480") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"--image-size {text!r}: width and height must be positive")
    return width, height


def representative_prompts(
    cfg: RunConfig, model_cfg: Any, tokenizer: Tokenizer, image_size: tuple[int, int], images: int
) -> PromptBatch:
    """data.prompts_per_step REC prompts with `images` blank images of `image_size` each, through the real
    prompt template, image processor (smart_resize with data.min/max_pixels) and vision plan."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "image.png")
        Image.new("RGB", image_size).save(path)
        count = cfg.data.prompts_per_step
        return encode_prompts(
            [REPRESENTATIVE_PROBLEM] * count,
            [[path] * images] * count,
            tokenizer,
            model_cfg,
            task_type=cfg.data.task_type,
            min_pixels=cfg.data.min_pixels,
            max_pixels=max_pixels_or_default(cfg.data.max_pixels, processor_of(model_cfg)),
            length=cfg.data.max_prompt_length,
        )


def abstract_batch(batch: PromptBatch, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs with the shardings `train.setup.to_device` gives the batch's host arrays."""
    out = {}
    axes = batch.batch_axes()
    for name, value in batch.arrays().items():
        logical: list[str | None] = [None] * value.ndim
        if name in axes:
            logical[axes[name]] = "batch"
        sharding = NamedSharding(mesh, logical_to_spec(logical, value.shape, mesh))
        out[name] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    return out


def outputs_of(compiled: jax.stages.Compiled) -> Any:
    """A compiled program's outputs as sharded ShapeDtypeStructs (the next program's abstract inputs)."""
    return jax.tree.map(
        lambda info, sharding: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding),
        compiled.out_info,
        compiled.output_shardings,
    )


# ------------------------------------------------------------------------------------------- accounting


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded arrays / ShapeDtypeStructs (its largest shard per leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def count_params(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def analytic_param_counts(cfg: Any, lora_rank: int = 0) -> dict[str, int] | None:
    """Parameter counts from the config alone (text, vision, LoRA adapters of rank `lora_rank`, total), where the
    family states its cost model (`ModelFamily.costs`); else None."""
    costs = family_of(cfg).costs
    return None if costs is None else costs.param_counts(cfg, lora_rank)


def counted_params(state: TrainState) -> dict[str, int]:
    """Parameter counts of a (possibly abstract) train state's model by component: text, vision, LoRA, total."""
    out = dict.fromkeys(("text", "vision", "lora"), 0)
    for part in (state.trainable, state.frozen):
        for path, leaf in jax.tree_util.tree_leaves_with_path(part):
            out[_component(path)] += math.prod(leaf.shape)
    return {**out, "total": sum(out.values())}


@dataclasses.dataclass
class ProgramReport:
    """One compiled program, per device (bytes from `memory_analysis`, FLOPs from `cost_analysis`)."""

    name: str
    lower_seconds: float
    compile_seconds: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    state_argument_bytes: int  # the part of the arguments that is persistent train state
    flops: float
    analytic_flops: float  # this program's analytical count, per device (nan: the family states no cost model)

    @property
    def extra_bytes(self) -> int:
        """What running it adds on top of the persistent state: its non-state arguments, outputs not aliased to
        donated inputs, temporaries and code."""
        return (
            self.argument_bytes
            - self.state_argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )


def program_report(name: str, jitted: Callable, args: tuple, state_args: Any) -> tuple[ProgramReport, Any]:
    """Lower and compile `jitted` on abstract `args`; its report and its abstract outputs."""
    log.info("compiling %s", name)
    start = time.perf_counter()
    lowered = jitted.lower(*args)  # type: ignore[attr-defined]  # a jax.jit function
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    log.info("%s: lowered in %.1f s, compiled in %.1f s", name, lowered_at - start, done - lowered_at)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    report = ProgramReport(
        name,
        lowered_at - start,
        done - lowered_at,
        memory.argument_size_in_bytes,
        memory.output_size_in_bytes,
        memory.alias_size_in_bytes,
        memory.temp_size_in_bytes,
        memory.generated_code_size_in_bytes,
        device_bytes(state_args),
        float(cost.get("flops", 0.0)),
        0.0,
    )
    return report, outputs_of(compiled)


# ------------------------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Plan:
    """Everything `vlmr1 plan` prints (and writes with --json), per device unless named otherwise."""

    recipe: str
    model: str
    device_kind: str
    devices: int
    hbm_bytes: int
    headroom: float
    mesh: dict[str, int]
    trainable: str
    remat: str
    dtype: str
    param_dtype: str
    prompts: int
    samples: int
    prompt_tokens: int
    new_tokens: int
    image_grid: tuple[int, ...]
    image_tokens: int
    params: int  # global, from the abstract model state (LoRA adapters included)
    analytic_params: dict[str, int]  # the family's cost model's, else counted from the abstract parameters
    state: dict[str, int]  # trainable, frozen, optimizer, reference, step
    gradients_bytes: int  # estimate: one gradient per trainable parameter, sharded like it
    kv_cache_bytes: int  # the sampler's fanned-out cache (inside its temporaries)
    logits_bytes: int  # one fp32 [rows, logits_chunk, vocab] chunk of completion logits (reference / step)
    programs: list[ProgramReport]
    component_bytes: dict[str, int]  # per-device bytes by part (vision / text / lora) of each state group

    @property
    def persistent_bytes(self) -> int:
        return sum(self.state.values())

    @property
    def largest(self) -> ProgramReport:
        return max(self.programs, key=lambda p: p.extra_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.persistent_bytes + self.largest.extra_bytes

    @property
    def budget_bytes(self) -> int:
        return int(self.hbm_bytes * self.headroom)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["programs"] = [{**dataclasses.asdict(p), "extra_bytes": p.extra_bytes} for p in self.programs]
        out.update(
            persistent_bytes=self.persistent_bytes,
            peak_bytes=self.peak_bytes,
            budget_bytes=self.budget_bytes,
            fits=self.fits,
            largest_program=self.largest.name,
            suggestions=suggestions(self),
        )
        return out


def _component(path: tuple) -> str:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if any(k in ("lora_a", "lora_b") for k in keys):
        return "lora"
    return "vision" if "visual" in keys else "text"


def component_bytes(state: TrainState) -> dict[str, int]:
    """Per-device bytes of each state group split by vision tower / text model / LoRA adapters."""
    out: dict[str, int] = {}
    for group in ("trainable", "frozen", "opt_state", "reference"):
        tree = getattr(state, group)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            key = f"{group}/{_component(path)}"
            out[key] = out.get(key, 0) + device_bytes(leaf)
    return out


def make_plan(
    cfg: RunConfig,
    devices: list[jax.Device],
    device_kind: str,
    *,
    recipe: str = "",
    hbm_gib: float | None = None,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    images: int = 1,
    headroom: float = HEADROOM,
) -> Plan:
    """Compile the recipe's sampler, reference log-prob and GRPO step for `devices` and account for them."""
    if device_kind not in DEVICE_HBM_GIB:
        raise ValueError(f"--device-kind {device_kind!r}; choose one of {sorted(DEVICE_HBM_GIB)}")
    if images < 1:
        raise ValueError(f"--images must be >= 1, got {images}")
    g = cfg.grpo
    if g.num_generations < 2:
        raise ValueError("grpo.num_generations must be >= 2 (advantages need a group)")
    mesh = make_mesh(cfg.mesh, devices)
    tokenizer = plan_tokenizer(cfg)
    model_cfg = model_config(cfg, tokenizer)
    # Shapes do not depend on the schedule's length; the trainer's is known only once the data is read.
    optimizer, schedule = make_optimizer(cfg.optim, max(cfg.train.max_steps, 1))
    graphdef, state = abstract_train_state(cfg, model_cfg, mesh, optimizer)
    batch = representative_prompts(cfg, model_cfg, tokenizer, image_size, images)
    prompts = abstract_batch(batch, mesh)
    key = jax.eval_shape(lambda: jax.random.fold_in(jax.random.key(cfg.train.seed), 0))

    from vlmr1_jax.train.loop import make_generate_fn

    with jax.set_mesh(mesh):  # activation / KV-cache constraints apply, as in the trainer
        reports = []
        report, rollout = program_report(
            "sampler",
            make_generate_fn(cfg, tokenizer, model_cfg, graphdef, unstack_layers=False),  # an accelerator's loop
            (state.trainable, state.frozen, prompts, key),
            (state.trainable, state.frozen),
        )
        reports.append(report)
        rows = cfg.data.prompts_per_step * g.num_generations
        ref_logprobs = None
        if g.beta > 0:
            report, ref_logprobs = program_report(
                "reference",
                make_logprob_fn(graphdef, g.num_generations),
                (state.reference, state.frozen, prompts, rollout.tokens, rollout.mask),
                (state.reference, state.frozen),
            )
            reports.append(report)
        train_batch = TrainExample(
            prompts,  # type: ignore[arg-type]  # abstract values
            rollout.tokens,
            rollout.mask,
            jax.ShapeDtypeStruct((rows,), np.float32),  # type: ignore[arg-type]
            ref_logprobs=ref_logprobs,
            old_logprobs=rollout.logprobs if g.num_iterations > 1 else None,
        )
        step_fn = make_grpo_step(graphdef, g, optimizer, schedule, cfg.optim.grad_accum, seed=cfg.train.seed)
        report, _ = program_report("grpo_step", step_fn, (state, train_batch), state)
        reports.append(report)

    prompt_len = batch.input_ids.shape[1]
    lora_rank = cfg.lora.rank if cfg.train.trainable == "lora" else 0
    costs = family_of(model_cfg).costs
    flops = (
        costs.flops(
            model_cfg,
            batch,
            samples=g.num_generations,
            new_tokens=cfg.sampling.max_new_tokens,
            trainable=cfg.train.trainable,
            remat=cfg.model.remat,
            lora_rank=lora_rank,
        )
        if costs is not None
        else {}
    )
    for r in reports:
        r.analytic_flops = flops[r.name] / len(devices) if flops else math.nan
    grid = batch.image_grids[0][0]
    text = model_cfg.text
    batch_shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    cache_rows = rows // batch_shards if rows % batch_shards == 0 else rows
    kv_cache = (
        2
        * text.num_hidden_layers
        * cache_rows
        * (prompt_len + cfg.sampling.max_new_tokens)
        * text.num_key_value_heads
        * text.head_dim
        * np.dtype(dtype_of(cfg.model.dtype)).itemsize
    )
    logits = cache_rows * min(cfg.model.logits_chunk, cfg.sampling.max_new_tokens) * text.vocab_size * 4
    hbm = hbm_gib if hbm_gib is not None else DEVICE_HBM_GIB[device_kind]
    return Plan(
        recipe=recipe,
        model=cfg.model.hf_model or cfg.model.preset or "",
        device_kind=device_kind,
        devices=len(devices),
        hbm_bytes=int(hbm * GIB),
        headroom=headroom,
        mesh=dict(mesh.shape),
        trainable=cfg.train.trainable,
        remat=cfg.model.remat,
        dtype=cfg.model.dtype,
        param_dtype=cfg.model.param_dtype,
        prompts=cfg.data.prompts_per_step,
        samples=g.num_generations,
        prompt_tokens=prompt_len,
        new_tokens=cfg.sampling.max_new_tokens,
        image_grid=grid,
        image_tokens=processor_of(model_cfg).image_tokens(grid),
        params=count_params(state.trainable) + count_params(state.frozen),
        analytic_params=analytic_param_counts(model_cfg, lora_rank) or counted_params(state),
        state={
            "trainable": device_bytes(state.trainable),
            "frozen": device_bytes(state.frozen),
            "optimizer": device_bytes(state.opt_state),
            "reference": device_bytes(state.reference),
            "step": device_bytes(state.step),
        },
        gradients_bytes=device_bytes(state.trainable),
        kv_cache_bytes=kv_cache,
        logits_bytes=logits,
        programs=reports,
        component_bytes=component_bytes(state),
    )


# ------------------------------------------------------------------------------------------- advice and output


def suggestions(plan: Plan) -> list[str]:
    """What to change when the plan does not fit, each with its estimated per-device effect."""
    if plan.fits:
        return []
    c = plan.component_bytes
    over = plan.peak_bytes - plan.budget_bytes
    step = next((p for p in plan.programs if p.name == "grpo_step"), plan.largest)
    out = [f"needs {gib(over)} GiB less per device (peak {gib(plan.peak_bytes)} > budget {gib(plan.budget_bytes)})"]
    sharded = plan.persistent_bytes - plan.state["step"]
    out.append(
        f"twice the devices (bigger fsdp, --devices {2 * plan.devices}): sharded state and batch "
        f"activations halve, about -{gib(sharded // 2 + plan.largest.extra_bytes // 2)} GiB (rerun to measure)"
    )
    if plan.remat != "full":
        out.append(
            "model.remat=full: the backward keeps one activation per decoder layer instead of all of them "
            f"(grpo_step temporaries now {gib(step.temp_bytes)} GiB)"
        )
    if plan.trainable == "full":
        vision = c.get("opt_state/vision", 0) + c.get("trainable/vision", 0) + c.get("reference/vision", 0)
        out.append(
            f"train.trainable=freeze_vision: no optimizer state, gradients or reference copy for the "
            f"vision tower, about -{gib(vision)} GiB"
        )
    if plan.trainable != "lora":
        text = sum(c.get(f"{g}/text", 0) for g in ("opt_state", "reference")) + c.get("trainable/text", 0)
        out.append(
            f"train.trainable=lora (recipe rec_3b_lora): optimizer state, gradients and reference only for "
            f"the adapters, about -{gib(text)} GiB before the adapters' own state"
        )
    out.append(
        f"data.prompts_per_step={max(plan.prompts // 2, 1)}: batch activations, KV cache and rollouts "
        f"halve, about -{gib(plan.largest.extra_bytes // 2)} GiB"
    )
    out.append(
        f"sampling.max_new_tokens={max(plan.new_tokens // 2, 1)}: KV cache and completion activations "
        f"roughly halve (KV cache now {gib(plan.kv_cache_bytes)} GiB)"
    )
    if plan.logits_bytes > plan.budget_bytes // 20:
        out.append(
            f"model.logits_chunk smaller: each chunk of completion logits is {gib(plan.logits_bytes)} GiB "
            f"(fp32, a few copies live in the backward)"
        )
    return out


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def format_plan(plan: Plan) -> str:
    """The human-readable table and verdict."""
    a = plan.analytic_params
    mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
    lines = [
        f"vlmr1 plan {plan.recipe}: {plan.model}, {plan.params / 1e9:.3f}B parameters ("
        f"{a['total'] / 1e9:.3f}B: text {a['text'] / 1e9:.3f}B, vision {a['vision'] / 1e9:.3f}B"
        + (f", LoRA {a['lora'] / 1e6:.1f}M" if a["lora"] else "")
        + ")",
        f"  train.trainable={plan.trainable} model.remat={plan.remat} dtype={plan.dtype} param_dtype="
        f"{plan.param_dtype}",
        f"  {plan.devices} x {plan.device_kind} ({plan.hbm_bytes / GIB:.0f} GiB each), mesh {mesh}",
        f"  {plan.prompts} prompts x {plan.samples} samples; prompt {plan.prompt_tokens} tokens (image grid "
        f"{plan.image_grid} -> {plan.image_tokens} tokens); {plan.new_tokens} new tokens",
        "",
        "persistent state per device           GiB",
    ]
    names = {
        "trainable": "trainable parameters",
        "frozen": "frozen parameters",
        "optimizer": "optimizer state",
        "reference": "reference policy",
    }
    for key, label in names.items():
        lines.append(f"  {label:<34} {gib(plan.state[key]):>7}")
    lines.append(f"  {'total':<34} {gib(plan.persistent_bytes):>7}")
    lines.append("")
    header = (
        f"{'program':<10} {'lower s':>8} {'compile s':>9} {'args':>8} {'out':>8} {'alias':>8} {'temp':>8} "
        f"{'code':>6} {'extra':>8} {'TFLOP xla':>10} {'TFLOP est':>10}"
    )
    lines += ["programs per device (GiB; extra = args - state + out - alias + temp + code)", header]
    for p in plan.programs:
        lines.append(
            f"{p.name:<10} {p.lower_seconds:>8.1f} {p.compile_seconds:>9.1f} {gib(p.argument_bytes):>8} "
            f"{gib(p.output_bytes):>8} {gib(p.alias_bytes):>8} {gib(p.temp_bytes):>8} "
            f"{gib(p.code_bytes):>6} {gib(p.extra_bytes):>8} {p.flops / 1e12:>10.2f} "
            f"{p.analytic_flops / 1e12:>10.2f}"
        )
    lines += [
        f"  inside the temporaries: gradients ~{gib(plan.gradients_bytes)} GiB (grpo_step), KV cache "
        f"{gib(plan.kv_cache_bytes)} GiB (sampler), completion logits {gib(plan.logits_bytes)} GiB per fp32 "
        "chunk (reference, grpo_step)",
        "  TFLOP xla: XLA's count for one device, a while loop's body counted once (the sampler's decode);"
        " est: analytical, whole program (nan: the model family states no cost model)",
        "",
        f"peak per device = persistent {gib(plan.persistent_bytes)} + {plan.largest.name} extra "
        f"{gib(plan.largest.extra_bytes)} = {gib(plan.peak_bytes)} GiB; budget {plan.headroom:.0%} of "
        f"{plan.hbm_bytes / GIB:.0f} GiB = {gib(plan.budget_bytes)} GiB",
    ]
    if plan.fits:
        lines.append(
            f"FITS {plan.devices} x {plan.device_kind}: headroom {gib(plan.budget_bytes - plan.peak_bytes)}"
            f" GiB under the budget"
        )
    else:
        lines.append(f"DOES NOT FIT {plan.devices} x {plan.device_kind}; to fit, try:")
        lines += [f"  - {s}" for s in suggestions(plan)]
    return "\n".join(lines)
