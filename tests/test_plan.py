"""`vlmr1 plan` (vlmr1_jax.train.plan) against the real thing: the trainer's state built and placed for real, its
programs compiled on real, allocated inputs on the 8-device CPU mesh, and parameter counts of real models."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import jax
import numpy as np
import pytest
from flax import nnx

from vlmr1_jax.cli import main
from vlmr1_jax.config import load_config
from vlmr1_jax.models.hf_weights import load_hf_model
from vlmr1_jax.models.layers import LoRAParam
from vlmr1_jax.models.qwen2_5_vl.config import PRESETS
from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL
from vlmr1_jax.parallel.mesh import make_mesh
from vlmr1_jax.processing.batch import to_device
from vlmr1_jax.rl.lora import apply_lora
from vlmr1_jax.rl.rollout import TrainExample
from vlmr1_jax.rl.state import init_train_state, make_optimizer
from vlmr1_jax.rl.step import make_grpo_step, make_logprob_fn
from vlmr1_jax.train.loop import make_generate_fn
from vlmr1_jax.train.plan import (
    DEVICE_HBM_GIB,
    EXIT_DOES_NOT_FIT,
    abstract_train_state,
    analytic_param_counts,
    device_bytes,
    make_plan,
    model_config,
    plan_tokenizer,
    representative_prompts,
)
from vlmr1_jax.train.setup import build_model, frozen_dtype_of, load_tokenizer, on_mesh

# Small shapes: 8 prompts x 2 samples (both split over the 8 devices), an 84x56 image (6 tokens), 8 new tokens.
SMALL = ["data.prompts_per_step=8", "grpo.num_generations=2", "sampling.max_new_tokens=8"]
IMAGE = (84, 56)
CASES = {  # the tiny preset trained fully in fp32; the demo-sized preset as LoRA with bf16 compute and remat
    "tiny-full": ["model.preset=tiny", "train.trainable=full"],
    "demo-s-lora": ["model.preset=demo-s", "train.trainable=lora", "model.dtype=bfloat16", "model.remat=full"],
}
MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
)


def addressable_bytes(tree) -> list[int]:
    """Bytes each device really holds of a tree of placed arrays."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return [per_device.get(d, 0) for d in jax.devices()]


def real_run(cfg):
    """What GRPOTrainer builds (model born sharded, train state, on_mesh), its programs compiled on the real
    arrays inside the mesh context (as the trainer runs them), and the rollout / reference actually computed to
    feed the step."""
    mesh = make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        return _real_run(cfg, mesh)


def _real_run(cfg, mesh):
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tokenizer, mesh)
    optimizer, schedule = make_optimizer(cfg.optim, cfg.train.max_steps)
    graphdef, state = init_train_state(
        model, cfg.train.trainable, optimizer, cfg.grpo.beta > 0, frozen_dtype=frozen_dtype_of(cfg.model)
    )
    state = on_mesh(state, mesh)
    batch = representative_prompts(cfg, model.cfg, tokenizer, IMAGE, 1)
    prompts = to_device(batch, mesh)
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), 0)
    g = cfg.grpo
    memory = {}
    sampler = (
        make_generate_fn(cfg, tokenizer, model.cfg, graphdef, unstack_layers=False)
        .lower(state.trainable, state.frozen, prompts, key)
        .compile()
    )
    memory["sampler"] = sampler.memory_analysis()
    out = sampler(state.trainable, state.frozen, prompts, key)
    reference = (
        make_logprob_fn(graphdef, g.num_generations)
        .lower(state.reference, state.frozen, prompts, out.tokens, out.mask)
        .compile()
    )
    memory["reference"] = reference.memory_analysis()
    train_batch = TrainExample(
        prompts,
        out.tokens,
        out.mask,
        np.zeros((out.tokens.shape[0],), np.float32),
        ref_logprobs=reference(state.reference, state.frozen, prompts, out.tokens, out.mask),
    )
    step = make_grpo_step(graphdef, g, optimizer, schedule, cfg.optim.grad_accum, seed=cfg.train.seed)
    memory["grpo_step"] = step.lower(state, train_batch).compile().memory_analysis()
    return state, train_batch, memory


@pytest.mark.parametrize("mode", ["full", "freeze_vision", "lora"])
def test_abstract_state_is_the_trainers(mode):
    """Every leaf of the abstract train state has the shape, dtype and sharding of the trainer's real one."""
    cfg = load_config("demo_tiny", [f"train.trainable={mode}", "model.frozen_dtype=bfloat16"])
    mesh = make_mesh(cfg.mesh)
    tokenizer = load_tokenizer(cfg)
    model = build_model(cfg, tokenizer, mesh)
    optimizer, _ = make_optimizer(cfg.optim, cfg.train.max_steps)
    _, real = init_train_state(model, mode, optimizer, cfg.grpo.beta > 0, frozen_dtype=frozen_dtype_of(cfg.model))
    real = on_mesh(real, mesh)
    _, abstract = abstract_train_state(cfg, model.cfg, mesh, optimizer)
    real_leaves, real_tree = jax.tree_util.tree_flatten_with_path(real)
    abstract_leaves, abstract_tree = jax.tree_util.tree_flatten_with_path(abstract)
    assert real_tree == abstract_tree
    for (path, x), (_, a) in zip(real_leaves, abstract_leaves):
        where = jax.tree_util.keystr(path)
        assert (x.shape, x.dtype) == (a.shape, a.dtype), where
        assert x.sharding.is_equivalent_to(a.sharding, x.ndim), (where, x.sharding, a.sharding)


@pytest.fixture(scope="module", params=sorted(CASES))
def planned(request):
    cfg = load_config("demo_tiny", SMALL + CASES[request.param])
    plan = make_plan(cfg, jax.devices(), "v5e", image_size=IMAGE)
    return cfg, plan, real_run(cfg)


@pytest.mark.slow
def test_abstract_compile_matches_real_inputs(planned):
    """Each program compiled on ShapeDtypeStructs has the memory_analysis of the same jitted function compiled
    on the real, allocated state and batch."""
    _, plan, (_, _, memory) = planned
    assert [p.name for p in plan.programs] == ["sampler", "reference", "grpo_step"]
    for p in plan.programs:
        real = memory[p.name]
        ours = (p.argument_bytes, p.output_bytes, p.alias_bytes, p.temp_bytes, p.code_bytes)
        assert ours == tuple(getattr(real, f) for f in MEMORY_FIELDS), p.name
        assert p.temp_bytes > 0 and p.compile_seconds > 0


@pytest.mark.slow
def test_state_bytes_are_the_real_addressable_bytes(planned):
    """Parameter / optimizer / reference bytes per device equal what each device of the real state holds, and
    memory_analysis is per device: the step's argument bytes are one device's shards of (state, batch)."""
    _, plan, (state, train_batch, _) = planned
    for key, tree in (
        ("trainable", state.trainable),
        ("frozen", state.frozen),
        ("optimizer", state.opt_state),
        ("reference", state.reference),
    ):
        real = addressable_bytes(tree)
        assert max(real) == plan.state[key], key
    step = next(p for p in plan.programs if p.name == "grpo_step")
    real_args = addressable_bytes((state, dataclasses.replace(train_batch, advantages=None)))
    # + the host advantages, which the compiler places as it likes (here: split over the devices)
    assert 0 <= step.argument_bytes - max(real_args) <= train_batch.advantages.nbytes
    assert step.argument_bytes < sum(real_args) / 4  # not the global size: 8 devices split it
    assert plan.gradients_bytes == plan.state["trainable"]


@pytest.mark.slow
def test_analytic_param_count_matches_real_models():
    """The formula's count equals the parameters of the real model: allocated for tiny, abstract (the real
    constructor under eval_shape) for the released sizes; LoRA adapters as apply_lora adds them."""
    tiny = Qwen25VL(PRESETS["tiny"], rngs=nnx.Rngs(0))
    count = lambda m: sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert analytic_param_counts(PRESETS["tiny"])["total"] == count(tiny)
    apply_lora(tiny, 4, 8.0)
    adapters = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(tiny, LoRAParam)))
    assert analytic_param_counts(PRESETS["tiny"], lora_rank=4)["lora"] == adapters
    for name in ("demo-s", "qwen2.5-vl-3b", "qwen2.5-vl-7b"):  # tied and untied heads
        abstract = nnx.eval_shape(lambda cfg=PRESETS[name]: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
        assert analytic_param_counts(PRESETS[name])["total"] == count(abstract), name
    assert abs(analytic_param_counts(PRESETS["qwen2.5-vl-3b"])["total"] / 1e9 - 3.75) < 0.01  # the release's size
    assert abs(analytic_param_counts(PRESETS["qwen2.5-vl-7b"])["total"] / 1e9 - 8.29) < 0.01


@pytest.mark.slow
def test_plan_params_are_the_model_params(planned):
    _cfg, plan, (state, _, _) = planned
    real = sum(x.size for x in jax.tree.leaves((state.trainable, state.frozen)))
    assert plan.params == real == plan.analytic_params["total"]


def test_param_bytes_fall_as_fsdp_grows():
    cfg = load_config("demo_tiny", ["model.preset=demo-s"])
    tokenizer = load_tokenizer(cfg)
    model_cfg = model_config(cfg, tokenizer)
    optimizer, _ = make_optimizer(cfg.optim, 1)
    sizes = []
    for n in (1, 2, 4, 8):
        _, state = abstract_train_state(cfg, model_cfg, make_mesh(cfg.mesh, jax.devices()[:n]), optimizer)
        sizes.append(device_bytes(state.trainable))
    assert sizes[0] > sizes[1] > sizes[2] > sizes[3]
    assert sizes[3] < sizes[0] / 4  # most of it is sharded (norms and biases of odd sizes stay replicated)


@pytest.mark.slow
def test_cli_table_and_verdicts(tmp_path, capsys):
    args = [
        "plan",
        "demo_tiny",
        *SMALL,
        *CASES["tiny-full"],
        "--devices",
        "8",
        "--device-kind",
        "h100",
        "--image-size",
        "x".join(map(str, IMAGE)),
    ]
    assert main([*args, "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "grpo_step" in out and "sampler" in out and "reference" in out
    assert "FITS 8 x h100" in out
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["fits"] and data["hbm_bytes"] == DEVICE_HBM_GIB["h100"] * 1024**3
    assert data["peak_bytes"] == data["persistent_bytes"] + max(p["extra_bytes"] for p in data["programs"])

    assert main([*args, "--hbm-gib", "0.001"]) == EXIT_DOES_NOT_FIT
    out = capsys.readouterr().out
    assert "DOES NOT FIT 8 x h100" in out
    assert "--devices 16" in out and "train.trainable=lora" in out and "model.remat=full" in out


@pytest.mark.slow
def test_cli_simulates_more_devices_in_a_fresh_process(capfd):
    """JAX already runs with 8 devices here: 16 needs a fresh process, which configures its CPU client first."""
    args = [
        "plan",
        "demo_tiny",
        "data.prompts_per_step=2",
        "grpo.num_generations=2",
        "sampling.max_new_tokens=4",
        "--devices",
        "16",
        "--device-kind",
        "v5p",
        "--image-size",
        "56x56",
    ]
    assert main(args) == 0
    out = capfd.readouterr().out
    assert "16 x v5p" in out and "fsdp=16" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-size", "640"], "--image-size '640': expected WIDTHxHEIGHT"),
        (["model.preset=null"], "model.hf_model=FOLDER"),
        (["train.trainable=everything"], "train.trainable='everything'"),
    ],
)
def test_cli_bad_input(extra, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["plan", "demo_tiny", *extra, "--devices", "8", "--device-kind", "v5e"])


def test_hf_folder_needs_only_its_config(tiny_hf_dir, tmp_path):
    """model.hf_model=FOLDER reads FOLDER/config.json alone (no weights, no tokenizer files): the abstract state
    has exactly the parameters of the model the trainer loads from the full folder."""
    (tmp_path / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    cfg = load_config("demo_tiny", [f"model.hf_model={tmp_path}"])
    model_cfg = model_config(cfg, plan_tokenizer(cfg))
    optimizer, _ = make_optimizer(cfg.optim, 1)
    _, state = abstract_train_state(cfg, model_cfg, make_mesh(cfg.mesh), optimizer)
    real = load_hf_model(tiny_hf_dir)
    shapes = lambda tree: [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]
    assert shapes(state.trainable) == shapes(nnx.state(real, nnx.Param))
