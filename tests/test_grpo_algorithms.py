"""The three GRPO settings (advantage estimator, token objective, aggregation) of vlmr1_jax.rl.grpo, each against a
numpy float64 reference written from its formula; any combination, user functions by 'module:function' path (also
through the jitted train step on the tiny model), and their config fields."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.losses import loss_inputs
from tests.helpers.prompts import SPECS, G, completions, device_prompts, train_prompts
from vlmr1_jax.config import LOSS_PRESETS, Algorithm, load_config
from vlmr1_jax.models.qwen2_5_vl.config import get_preset
from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL
from vlmr1_jax.rl.grpo import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    OBJECTIVES,
    check_algorithm,
    group_advantages,
    make_loss,
)
from vlmr1_jax.rl.rollout import TrainExample
from vlmr1_jax.rl.state import init_train_state, make_optimizer
from vlmr1_jax.rl.step import make_grpo_step

B, T = 6, 10
LENGTHS = np.array([10, 4, 0, 1, 7, 10])  # full rows, early EOS, a fully masked (padding) row, a one-token row
EPS, EPS_HIGH, BETA = 0.2, 0.28, 0.04
THIS = __name__  # user functions below are named f"{THIS}:function", as a recipe names them


def _inputs(seed: int) -> dict[str, np.ndarray]:
    return loss_inputs(seed, LENGTHS, T)


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------- numpy references (float64, from the formulas)


def np_advantages(name: str, rewards: np.ndarray, g: int) -> np.ndarray:
    out = []
    for group in rewards.reshape(-1, g):
        for i, r in enumerate(group):
            if name == "grpo":
                out.append((r - group.mean()) / (group.std(ddof=1) + 1e-4))
            elif name == "dr_grpo":
                out.append(r - group.mean())
            else:  # rloo: the baseline is the mean of the other samples of the group
                out.append(r - np.delete(group, i).mean())
    return np.array(out)


def np_objective(name: str, logp, old, adv, mask) -> tuple[np.ndarray, dict[str, float]]:
    """Per-token loss and metrics: PPO-clip on the token ratio, or on GSPO's sequence ratio exp(mean_t log-ratio)."""
    if name == "ppo_clip":
        ratio = np.exp(logp - old)
    else:
        ratio = np.zeros_like(logp)
        for i in range(B):
            n = mask[i].sum()
            ratio[i] = np.exp(((logp[i] - old[i]) * mask[i]).sum() / n) if n else 1.0
    clipped = np.clip(ratio, 1 - EPS, 1 + EPS_HIGH)
    plain, clip = ratio * adv[:, None], clipped * adv[:, None]
    valid = mask.sum()
    metrics = {
        "clip_ratio": ((plain < clip) * mask).sum() / valid,
        "clip_active_ratio": ((clip < plain) * mask).sum() / valid,
        "ratio_mean": (ratio * mask).sum() / valid,
    }
    return -np.minimum(plain, clip), metrics


def np_aggregate(name: str, per_token, mask, max_len: int) -> float:
    if name == "seq_mean_token_mean":  # a fully masked row counts as a row with loss 0
        return np.mean([(per_token[i] * mask[i]).sum() / max(mask[i].sum(), 1) for i in range(B)])
    total = sum(per_token[i, t] for i in range(B) for t in range(T) if mask[i, t])
    return total / mask.sum() if name == "token_mean" else total / (B * max_len)


# ---------------------------------------------------------------- user functions, named by path


def median_baseline(rewards: jax.Array) -> jax.Array:
    """A user advantage estimator: r - median of the group."""
    return rewards - jnp.median(rewards, axis=1, keepdims=True)


def reinforce(logp, old_logp, advantages, mask, *, epsilon, epsilon_high):
    """A user objective: plain REINFORCE, -A * logp, no ratio."""
    return -advantages[:, None] * logp, {"logp_mean": jnp.sum(logp * mask) / jnp.sum(mask)}


def seq_sum_mean(per_token, mask, max_completion_length):
    """A user aggregation: sum over each sequence's tokens, then the mean over sequences."""
    return jnp.mean(jnp.sum(per_token * mask, axis=1))


def per_row(per_token, mask, max_completion_length):
    """A broken user aggregation: [B] instead of a scalar."""
    return jnp.sum(per_token * mask, axis=1)


# ---------------------------------------------------------------- advantage estimators


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("g", [2, 3, 5])
def test_estimator_matches_numpy(name, g):
    rewards = np.random.default_rng(g).uniform(0, 2, size=6 * g)
    adv, std = group_advantages(jnp.asarray(rewards), g, name)
    np.testing.assert_allclose(np.asarray(adv), np_advantages(name, rewards, g), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(std), rewards.reshape(-1, g).std(axis=1, ddof=1), rtol=1e-5, atol=1e-7)


def test_estimators_on_a_binary_group_by_hand():
    """One correct answer of four: GRPO divides by the std 0.5, Dr.GRPO does not, RLOO's baseline excludes itself."""
    rewards = jnp.asarray([1.0, 0.0, 0.0, 0.0])
    table = {"grpo": [0.75 / 0.5001, -0.25 / 0.5001], "dr_grpo": [0.75, -0.25], "rloo": [1.0, -1 / 3]}
    for name, (first, rest) in table.items():
        np.testing.assert_allclose(
            np.asarray(group_advantages(rewards, 4, name)[0]), [first] + [rest] * 3, rtol=1e-6, err_msg=name
        )


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_all_equal_group_gives_exact_zero(name):
    rewards = jnp.asarray(np.repeat([0.1, 1 / 3, 0.7, 2.3], 5))
    assert np.all(np.asarray(group_advantages(rewards, 5, name)[0]) == 0.0)


def test_user_estimator_by_path():
    rewards = np.random.default_rng(0).uniform(0, 1, size=12)
    adv, _ = group_advantages(jnp.asarray(rewards), 4, f"{THIS}:median_baseline")
    grouped = rewards.reshape(-1, 4)
    np.testing.assert_allclose(
        np.asarray(adv), (grouped - np.median(grouped, axis=1, keepdims=True)).reshape(-1), rtol=1e-6, atol=1e-7
    )
    with pytest.raises(ValueError, match=r"returned shape .* must keep the"):
        group_advantages(jnp.asarray(rewards), 4, f"{THIS}:per_row_estimator")


def per_row_estimator(rewards: jax.Array) -> jax.Array:
    """A broken user estimator: one value per group."""
    return rewards.mean(axis=1)


# ---------------------------------------------------------------- objectives x aggregations (+ k3 KL)


@pytest.mark.parametrize("objective", ["ppo_clip", "gspo"])
@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean", "token_sum_norm"])
def test_every_combination_matches_numpy(objective, aggregation):
    x = _inputs(0)
    loss, metrics = make_loss(objective, aggregation)(
        _f32(x["logp"]),
        _f32(x["old"]),
        _f32(x["ref"]),
        _f32(x["adv"]),
        _f32(x["mask"]),
        epsilon=EPS,
        epsilon_high=EPS_HIGH,
        beta=BETA,
        max_completion_length=16,
    )
    per_token, want_metrics = np_objective(objective, x["logp"], x["old"], x["adv"], x["mask"])
    kl = np.exp(x["ref"] - x["logp"]) - (x["ref"] - x["logp"]) - 1
    want = np_aggregate(aggregation, per_token + BETA * kl, x["mask"], max_len=16)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
    want_metrics["kl"] = np_aggregate("seq_mean_token_mean", kl, x["mask"], 16)
    assert set(metrics) == set(want_metrics)
    for key, value in want_metrics.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=2e-5, atol=1e-6, err_msg=key)
    if objective == "ppo_clip":  # the inputs reach both clip edges
        assert 0 < want_metrics["clip_ratio"] < 1 and 0 < want_metrics["clip_active_ratio"] < 1


@pytest.mark.parametrize("objective", ["ppo_clip", "gspo"])
def test_objective_gradient_matches_the_formula(objective):
    """d loss / d logp[i, t] (beta = 0, token_mean over N tokens): -A_i * ratio * (tokens carrying the ratio) *
    d(log-ratio) / N where the min keeps the unclipped term, else 0. GSPO's log-ratio is the sequence mean, on all
    |o_i| tokens: d(log-ratio)/d logp[i, t] = 1 / |o_i|, so every token gets the same share."""
    x = _inputs(1)
    x["old"] = x["old"] + np.array([0.5, -0.5, 0.0, 0.4, -0.4, 0.1])[:, None]  # sequence ratios out of the clip range
    fn = make_loss(objective, "token_mean")
    grad = jax.grad(
        lambda lp: fn(
            lp, _f32(x["old"]), None, _f32(x["adv"]), _f32(x["mask"]), epsilon=EPS, epsilon_high=EPS_HIGH, beta=0.0
        )[0]
    )(_f32(x["logp"]))
    if objective == "ppo_clip":
        ratio, carriers, d_log_ratio = np.exp(x["logp"] - x["old"]), 1, x["mask"]
    else:
        lengths = np.maximum(x["mask"].sum(axis=1, keepdims=True), 1)
        ratio = np.exp(((x["logp"] - x["old"]) * x["mask"]).sum(axis=1, keepdims=True) / lengths)
        carriers, d_log_ratio = lengths, x["mask"] / lengths
    unclipped = ratio * x["adv"][:, None] <= np.clip(ratio, 1 - EPS, 1 + EPS_HIGH) * x["adv"][:, None]
    want = -x["adv"][:, None] * ratio * carriers * d_log_ratio * unclipped / x["mask"].sum()
    np.testing.assert_allclose(np.asarray(grad), want * x["mask"], rtol=1e-5, atol=1e-8)
    assert np.any(want != 0) and np.any((want == 0) & (x["mask"] == 1))  # both kept and clipped-off tokens


@pytest.mark.parametrize("objective", ["ppo_clip", "gspo"])
@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean", "token_sum_norm"])
def test_padding_does_not_matter(objective, aggregation):
    """Other values at masked positions change neither the loss nor the gradient, which is 0 there."""
    x, noise = _inputs(2), np.random.default_rng(3).normal(size=(3, B, T)) * 5.0
    pad = x["mask"] == 0
    fn = make_loss(objective, aggregation)

    def value_and_grad(logp, old, ref):
        return jax.value_and_grad(
            lambda lp: fn(
                lp, _f32(old), _f32(ref), _f32(x["adv"]), _f32(x["mask"]), epsilon=EPS, epsilon_high=EPS_HIGH, beta=BETA
            )[0]
        )(_f32(logp))

    loss, grad = value_and_grad(x["logp"], x["old"], x["ref"])
    other_loss, other_grad = value_and_grad(
        *(np.where(pad, x[k] + n, x[k]) for k, n in zip(("logp", "old", "ref"), noise))
    )
    np.testing.assert_allclose(float(other_loss), float(loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(other_grad), np.asarray(grad), rtol=1e-6, atol=1e-9)
    assert np.all(np.asarray(grad)[pad] == 0) and np.isfinite(float(loss))


@pytest.mark.parametrize("name", sorted(LOSS_PRESETS))
def test_preset_is_its_parts(name):
    """A preset's loss is the loss of its three parts, the same numbers as the combination test checks."""
    x = _inputs(4)
    preset = LOSS_PRESETS[name]
    args = (_f32(x["logp"]), _f32(x["old"]), _f32(x["ref"]), _f32(x["adv"]), _f32(x["mask"]))
    loss, _ = make_loss(preset.objective, preset.aggregation)(*args, epsilon=EPS, epsilon_high=EPS_HIGH, beta=BETA)
    per_token, _ = np_objective(preset.objective, x["logp"], x["old"], x["adv"], x["mask"])
    kl = np.exp(x["ref"] - x["logp"]) - (x["ref"] - x["logp"]) - 1
    np.testing.assert_allclose(
        float(loss), np_aggregate(preset.aggregation, per_token + BETA * kl, x["mask"], T), rtol=2e-5, atol=1e-6
    )


def test_user_objective_and_aggregation_by_path():
    x = _inputs(5)
    fn = make_loss(f"{THIS}:reinforce", f"{THIS}:seq_sum_mean")
    loss, metrics = fn(_f32(x["logp"]), None, None, _f32(x["adv"]), _f32(x["mask"]), beta=0.0)
    want = np.mean([(-x["adv"][i] * x["logp"][i] * x["mask"][i]).sum() for i in range(B)])
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["logp_mean"]), (x["logp"] * x["mask"]).sum() / x["mask"].sum(), rtol=1e-5)
    with pytest.raises(ValueError, match=r"aggregation .*per_row' returned shape \(6,\), expected a scalar"):
        make_loss("ppo_clip", f"{THIS}:per_row")(_f32(x["logp"]), None, None, _f32(x["adv"]), _f32(x["mask"]), beta=0.0)


@pytest.mark.parametrize(
    "registry, message",
    [
        (ADVANTAGE_ESTIMATORS, "unknown advantage estimator 'x'"),
        (OBJECTIVES, "unknown objective 'x'"),
        (AGGREGATIONS, "unknown aggregation 'x'"),
    ],
)
def test_registry_errors(registry, message):
    with pytest.raises(ValueError, match=f"{message}; registered: .*package.module:function"):
        registry.get("x")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        registry.get("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        registry.get(f"{THIS}:missing")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.names()[0])(lambda *a, **k: None)


# ---------------------------------------------------------------- config fields


@pytest.mark.parametrize("name", sorted(LOSS_PRESETS))
def test_config_presets(name):
    assert load_config("demo_tiny", [f"grpo.loss={name}"]).grpo.algorithm() == LOSS_PRESETS[name]


@pytest.mark.parametrize(
    "overrides, want",
    [
        (["grpo.loss=dapo", "grpo.objective=gspo"], Algorithm("grpo", "gspo", "token_mean")),
        (
            ["grpo.loss=gspo", "grpo.advantage_estimator=rloo", "grpo.aggregation=token_sum_norm"],
            Algorithm("rloo", "gspo", "token_sum_norm"),
        ),
        (["grpo.loss=dr_grpo", "grpo.scale_rewards=false"], Algorithm("dr_grpo", "ppo_clip", "token_sum_norm")),
        (
            ["grpo.scale_rewards=false", "grpo.advantage_estimator=dr_grpo"],
            LOSS_PRESETS["grpo"]._replace(advantage_estimator="dr_grpo"),
        ),
        (
            [f"grpo.aggregation={THIS}:seq_sum_mean", f"grpo.advantage_estimator={THIS}:median_baseline"],
            Algorithm(f"{THIS}:median_baseline", "ppo_clip", f"{THIS}:seq_sum_mean"),
        ),
    ],
)
def test_config_parts_override_the_preset(overrides, want):
    assert load_config("demo_tiny", overrides).grpo.algorithm() == want


@pytest.mark.parametrize(
    "override, message",
    [
        ("grpo.loss=ppo", r"^grpo.loss='ppo': expected one of \['dapo', 'dr_grpo', 'grpo', 'gspo'\]"),
        (
            "grpo.advantage_estimator=gae",
            r"^grpo.advantage_estimator='gae': expected one of \['dr_grpo', 'grpo', "
            r"'rloo'\] or a user function 'package.module:function'",
        ),
        ("grpo.objective=ppo", r"^grpo.objective='ppo': expected one of \['gspo', 'ppo_clip'\]"),
        (
            "grpo.aggregation=sum",
            r"^grpo.aggregation='sum': expected one of \['seq_mean_token_mean', 'token_mean', "
            r"'token_sum_norm'\]",
        ),
        ("grpo.aggregation=no_such_module_xyz:fn", r"^grpo.aggregation=.*cannot import module 'no_such_module_xyz'"),
        (f"grpo.objective={THIS}:missing", r"^grpo.objective=.*has no attribute 'missing'"),
    ],
)
def test_config_names_the_bad_field(override, message):
    with pytest.raises(ValueError, match=message):
        check_algorithm(load_config("demo_tiny", [override]).grpo)


def test_scale_rewards_false_needs_the_unscaled_estimator():
    with pytest.raises(
        ValueError,
        match=r"^grpo.scale_rewards=False: expected true with "
        r"grpo.advantage_estimator='rloo' \(false means the dr_grpo estimator\)",
    ):
        load_config("demo_tiny", ["grpo.scale_rewards=false", "grpo.advantage_estimator=rloo"])


# ---------------------------------------------------------------- a user aggregation in the jitted train step


@pytest.mark.slow  # 35 s cold on 2 cores (17 s with a warm compile cache): the tiny model's train step
def test_user_aggregation_in_the_jitted_step():
    """On-policy with beta = 0 every token's loss is -A_i (ratio 1), so the step's loss is the user aggregation of
    -A_i over the completion tokens: mean_i(-A_i * |o_i|), whatever the model's log-probs."""
    cfg = load_config(
        "demo_tiny", [f"grpo.num_generations={G}", "grpo.beta=0", f"grpo.aggregation={THIS}:seq_sum_mean"]
    )
    model_cfg = get_preset("tiny")
    tx, schedule = make_optimizer(cfg.optim, total_steps=10)
    graphdef, state = init_train_state(Qwen25VL(model_cfg, rngs=nnx.Rngs(0)), "full", tx, with_reference=False)
    step = make_grpo_step(graphdef, cfg.grpo, tx, schedule)
    prompts, _ = train_prompts(model_cfg)
    tokens, mask = completions(len(SPECS) * G)
    advantages = np.random.default_rng(0).standard_normal(len(tokens)).astype(np.float32)
    batch = TrainExample(device_prompts(prompts), jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(advantages))
    _, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(-advantages * mask.sum(axis=1)), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), 1.0, atol=1e-6)
    assert float(metrics["grad_norm"]) > 0 and "kl" not in metrics
