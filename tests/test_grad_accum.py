"""Gradient accumulation (GA) and num_iterations (mu) with VLM-R1's semantics, through `GRPOTrainer.train`.

VLM-R1 stores one rollout per accumulation slot when `global_step % mu == 0` and replays the buffer on the other
mu - 1 optimizer steps; each optimizer step averages the gradients of the GA slots. A run of GA = 2, mu = 2 and four
optimizer steps must therefore make the updates

    theta1 = adam(theta0, mean(g(theta0, a), g(theta0, b)))      rollouts a, b sampled at theta0
    theta2 = adam(theta1, mean(g(theta1, a), g(theta1, b)))      same rollouts, same old log-probs
    theta3, theta4: the same with rollouts c, d sampled at theta2

with the learning rate of HF's linear schedule sized in optimizer steps. The reference below replays that sequence
with plain optax and a hand-written learning-rate list; its per-slot gradient is jax.grad of the GRPO loss
(`make_loss` on `completion_logprobs`), whose values are checked against numpy and transformers in
test_grpo_math.py and test_train_step.py, so what is tested here is the order of the updates, not the loss.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.helpers.runs import TINY_RUN, jsonl, make_run_inputs, reproducible
from vlmr1_jax.config import OptimConfig, RunConfig, load_config
from vlmr1_jax.parallel.mesh import MeshConfig, make_mesh
from vlmr1_jax.rl.grpo import make_loss
from vlmr1_jax.rl.state import make_optimizer
from vlmr1_jax.rl.step import completion_logprobs
from vlmr1_jax.train.base import RunParts
from vlmr1_jax.train.loop import GRPOTrainer
from vlmr1_jax.train.metrics import read_metrics
from vlmr1_jax.train.setup import build_model, load_samples, load_tokenizer, resolve_max_steps

GA, MU, STEPS = 2, 2, 4
PROMPTS = 4  # per optimizer step: GA micro-batches of 2
G = 4  # TINY_RUN's num_generations
LR = 1e-3
ADAM_EPS = 1e-3  # keeps Adam's update a smooth function of the gradient (tests/helpers/train.py)


def hf_linear_lr(step: int, total: int, warmup: int = 0) -> float:
    """transformers' get_linear_schedule_with_warmup multiplier at optimizer step `step` (0-based), times LR."""
    if step < warmup:
        return LR * step / max(1, warmup)
    return LR * max(0.0, (total - step) / max(1, total - warmup))


def config(tmp: Path, run: Path, *extra: str) -> RunConfig:
    return load_config(
        "demo_tiny",
        [
            *make_run_inputs(tmp),
            *TINY_RUN,
            f"data.prompts_per_step={PROMPTS}",
            f"optim.grad_accum={GA}",
            f"grpo.num_iterations={MU}",
            f"train.max_steps={STEPS}",
            "optim.schedule=linear",
            f"optim.learning_rate={LR}",
            f"optim.eps={ADAM_EPS}",
            "train.save_every=2",
            "train.keep_checkpoints=4",
            f"train.output_dir={run}",
            *extra,
        ],
    )


def recording_trainer(cfg: RunConfig) -> tuple[GRPOTrainer, list, list]:
    """A trainer on one device that records each rollout's TrainExample (in sampling order) and the micro-batches
    of each optimizer-step call."""
    mesh = make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
    tokenizer = load_tokenizer(cfg)
    trainer = GRPOTrainer(
        cfg, RunParts(mesh, tokenizer, load_samples(cfg), build_model(cfg, tokenizer, mesh)), progress=False
    )
    rollouts: list = []
    calls: list = []
    rollout, step_fn = trainer.rollout, trainer.step_fn

    def record_rollout(*args, **kwargs):
        out = rollout(*args, **kwargs)
        rollouts.append(out[0])
        return out

    def record_step(state, *batches):
        calls.append(batches)
        return step_fn(state, *batches)

    trainer.rollout, trainer.step_fn = record_rollout, record_step  # type: ignore[method-assign]
    return trainer, rollouts, calls


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accum")
    cfg = config(tmp, tmp / "run")
    trainer, rollouts, calls = recording_trainer(cfg)
    theta0 = jax.tree.map(jnp.copy, trainer.state.trainable)
    trainer.train()
    return {"cfg": cfg, "tmp": tmp, "trainer": trainer, "theta0": theta0, "rollouts": rollouts, "calls": calls}


def by_path(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def prompt_count(example) -> int:
    return int(example.prompts["input_ids"].shape[0])


@pytest.mark.slow
def test_each_step_averages_one_rollout_per_slot_and_each_rollout_serves_mu_steps(run):
    rollouts, calls = run["rollouts"], run["calls"]
    assert len(rollouts) == GA * STEPS // MU  # a fresh rollout per slot, once per mu optimizer steps
    assert [prompt_count(r) for r in rollouts] == [PROMPTS // GA] * len(rollouts)
    assert all(int(r.tokens.shape[0]) == G * PROMPTS // GA for r in rollouts)
    assert len(calls) == STEPS
    for step, batches in enumerate(calls):
        phase = step // MU
        expected = rollouts[phase * GA : (phase + 1) * GA]
        assert len(batches) == GA and all(b is e for b, e in zip(batches, expected)), f"optimizer step {step + 1}"
        assert sum(prompt_count(b) for b in batches) == PROMPTS  # prompts per optimizer step
    assert all(r.old_logprobs is not None for r in rollouts)  # mu > 1: the sampling policy's log-probs are kept
    logged = jsonl(Path(run["cfg"].train.output_dir) / "rollouts.jsonl")
    per_step = {s: sum(1 for r in logged if r["step"] == s) for s in {r["step"] for r in logged}}
    assert per_step == {1: PROMPTS * G, 3: PROMPTS * G}  # each phase's rollouts, logged at its first step


@pytest.mark.slow
def test_parameters_equal_plain_optax_replay_of_the_expected_updates(run):
    cfg, trainer, rollouts = run["cfg"], run["trainer"], run["rollouts"]
    graphdef, frozen = trainer.graphdef, trainer.state.frozen
    algorithm = cfg.grpo.algorithm()
    loss_fn = make_loss(algorithm.objective, algorithm.aggregation)

    @jax.jit
    def policy_logprobs(theta, example):
        model = nnx.merge(graphdef, theta, frozen)
        return completion_logprobs(model, example.prompts, example.tokens, example.mask, G)

    @jax.jit
    def gradient(theta, example):
        def loss(theta):
            return loss_fn(
                policy_logprobs(theta, example),
                example.old_logprobs,
                example.ref_logprobs,
                jnp.asarray(example.advantages),
                example.mask,
                epsilon=cfg.grpo.epsilon,
                epsilon_high=cfg.grpo.epsilon_high,
                beta=cfg.grpo.beta,
                max_completion_length=example.tokens.shape[1],
            )[0]

        return jax.grad(loss)(theta)

    assert any(np.abs(np.asarray(r.advantages)).max() > 0 for r in rollouts)  # the updates are not KL-only
    lrs = jnp.asarray([hf_linear_lr(t, STEPS) for t in range(STEPS)], jnp.float32)
    o = cfg.optim
    tx = optax.chain(
        optax.clip_by_global_norm(o.max_grad_norm),
        optax.adamw(lambda count: lrs[count], b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
    )

    @jax.jit
    def adam_on_mean(theta, opt_state, grads):
        mean = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
        updates, opt_state = tx.update(mean, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state

    theta = run["theta0"]
    opt_state = tx.init(theta)
    for phase in range(STEPS // MU):
        slots = rollouts[phase * GA : (phase + 1) * GA]
        for slot in slots:  # sampled by the policy at the phase's start (sampler log-probs = forward's to ~1e-6)
            mask = np.asarray(slot.mask, bool)
            np.testing.assert_allclose(
                np.asarray(slot.old_logprobs)[mask], np.asarray(policy_logprobs(theta, slot))[mask], atol=2e-4
            )
        for _ in range(MU):
            theta, opt_state = adam_on_mean(theta, opt_state, [gradient(theta, slot) for slot in slots])
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(run["theta0"])))
    assert moved > 1e-4  # the comparison below is about real updates
    got = by_path(trainer.state.trainable)
    for path, want in by_path(theta).items():
        np.testing.assert_allclose(got[path], want, atol=2e-6, err_msg=path)


@pytest.mark.slow
def test_metrics_rows_are_optimizer_steps_with_the_schedules_learning_rate(run):
    rows = read_metrics(run["cfg"].train.output_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [r["learning_rate"] for r in rows], [hf_linear_lr(t, STEPS) for t in range(STEPS)], rtol=1e-6
    )
    # The steps of one phase train on the same rollouts: its reward metrics, once per step.
    assert rows[0]["reward"] == rows[1]["reward"] and rows[2]["reward"] == rows[3]["reward"]
    assert [r["epoch"] for r in rows] == pytest.approx([s * PROMPTS / 16 / MU for s in range(1, STEPS + 1)])


@pytest.mark.slow
def test_resume_from_a_mid_run_checkpoint_ends_identical(run):
    """Checkpoints are named by optimizer step; resuming at step 2 (the first phase's end) reruns the second phase
    exactly: same parameters, same metrics."""
    first = Path(run["cfg"].train.output_dir)
    second = run["tmp"] / "resumed"
    shutil.copytree(first, second)
    shutil.rmtree(second / "checkpoints" / str(STEPS))
    cfg = dataclasses.replace(run["cfg"], train=dataclasses.replace(run["cfg"].train, output_dir=str(second)))
    trainer, rollouts, calls = recording_trainer(cfg)
    assert trainer.step == int(trainer.state.step) == MU
    trainer.train()
    assert len(rollouts) == GA and len(calls) == MU
    uninterrupted = by_path(run["trainer"].state.trainable)
    for path, value in by_path(trainer.state.trainable).items():
        np.testing.assert_array_equal(value, uninterrupted[path], err_msg=path)
    assert [reproducible(r) for r in read_metrics(second)] == [reproducible(r) for r in read_metrics(first)]


def test_schedule_counts_optimizer_steps_with_warmup():
    """Warmup then linear decay to 0 after the last optimizer step, whatever grad_accum is (HF's schedule)."""
    total, warmup = 6, 2
    for grad_accum in (1, 4):
        tx, schedule = make_optimizer(
            OptimConfig(learning_rate=LR, warmup_steps=warmup, grad_accum=grad_accum), total_steps=total
        )
        got = [float(schedule(t)) for t in range(total + 1)]
        np.testing.assert_allclose(got, [hf_linear_lr(t, total, warmup) for t in range(total + 1)], atol=1e-12)
        # The optimizer applies one update per call (accumulation is the train step's): Adam's count is the step.
        params = {"w": jnp.zeros(())}
        state = tx.init(params)
        for _ in range(3):
            _, state = tx.update({"w": jnp.ones(())}, state, params)
        assert [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(state, "count")] == [3, 3]


def test_prompts_per_step_must_split_into_micro_batches():
    with pytest.raises(ValueError, match=r"data\.prompts_per_step=3: expected a multiple of optim\.grad_accum=2"):
        load_config("demo_tiny", ["data.prompts_per_step=3", "optim.grad_accum=2"])


def test_max_steps_counts_optimizer_steps():
    cfg = load_config("demo_tiny", ["grpo.num_iterations=2", "train.max_steps=5"])
    with pytest.raises(ValueError, match=r"train\.max_steps=5: expected a multiple of grpo\.num_iterations=2"):
        resolve_max_steps(cfg, 100, cfg.grpo.num_iterations)
    # An epoch of 100 samples is 50 rollout phases of 2 prompts, each used for 2 optimizer steps.
    epochs = load_config("demo_tiny", ["grpo.num_iterations=2", "train.max_steps=0", "data.num_epochs=3"])
    assert resolve_max_steps(epochs, 100, epochs.grpo.num_iterations) == 100 // 2 * 3 * 2
