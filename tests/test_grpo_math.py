"""GRPO math (vlmr1_jax.rl.grpo) against independent references: each `grpo.loss` preset, advantages, masks.

References: numpy float64 written from VLM-R1's loss (docs/facts.md: Loss; DAPO / Dr.GRPO / GSPO formulas), a torch
autograd copy of VLM-R1's compute_loss for the gradient, torch log_softmax+gather, and hand-written mask tables.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.helpers.losses import loss_inputs
from vlmr1_jax.config import LOSS_PRESETS
from vlmr1_jax.rl.grpo import OBJECTIVES, completion_mask, group_advantages, make_loss, token_logprobs

LOSSES = ("grpo", "dapo", "dr_grpo", "gspo")
B, T = 8, 12
# Completion lengths: full rows, EOS early, and a row whose mask keeps only its first token.
LENGTHS = np.array([12, 3, 1, 7, 12, 5, 9, 2])
# (epsilon, epsilon_high, beta)
CLIP_KL = [(0.2, None, 0.0), (0.2, None, 0.04), (0.2, 0.28, 0.04), (0.1, 0.3, 0.5)]


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    return loss_inputs(seed, LENGTHS, T)


# ---------------------------------------------------------------- numpy references (float64, from the formulas)


def np_group_advantages(r: np.ndarray, g: int, scale: bool) -> tuple[np.ndarray, np.ndarray]:
    grouped = r.reshape(-1, g)
    mean = grouped.mean(axis=1, keepdims=True)
    std = grouped.std(axis=1, ddof=1, keepdims=True)  # torch.std: unbiased
    adv = (grouped - mean) / (std + 1e-4) if scale else grouped - mean
    return adv.reshape(-1), std[:, 0]


def np_loss(name, logp, old, ref, adv, mask, eps, eps_high, beta, max_len=None):
    """Loss and metrics of `name` in float64, one formula per loss."""
    eps_high = eps if eps_high is None else eps_high
    n = mask.sum(axis=1)
    if name == "gspo":
        seq = ((logp - old) * mask).sum(axis=1) / n
        ratio = np.repeat(np.exp(seq)[:, None], T, axis=1)
    else:
        ratio = np.exp(logp - old)
    clipped = np.clip(ratio, 1 - eps, 1 + eps_high)
    a = adv[:, None]
    l1, l2 = ratio * a, clipped * a
    per_tok = -np.minimum(l1, l2)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    if beta:
        per_tok = per_tok + beta * kl
    if name in ("grpo", "gspo"):
        loss = ((per_tok * mask).sum(axis=1) / n).mean()
    elif name == "dapo":
        loss = (per_tok * mask).sum() / mask.sum()
    else:  # dr_grpo
        loss = (per_tok * mask).sum() / (B * (max_len or T))
    metrics = {
        "clip_ratio": ((l1 < l2) * mask).sum() / mask.sum(),
        "clip_active_ratio": ((l2 < l1) * mask).sum() / mask.sum(),
        "ratio_mean": (ratio * mask).sum() / mask.sum(),
    }
    if beta:
        metrics["kl"] = ((kl * mask).sum(axis=1) / n).mean()
    return loss, metrics


def torch_vlmr1_compute_loss(per_token_logps, old, ref, advantages, completion_mask, epsilon, epsilon_high, beta):
    """VLM-R1 compute_loss as VLM-R1 computes it, with autograd: ratio vs old (detached current when old is None)."""
    old = per_token_logps.detach() if old is None else old
    coef_1 = torch.exp(per_token_logps - old)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + (epsilon_high or epsilon))
    per_token_loss = -torch.min(coef_1 * advantages.unsqueeze(1), coef_2 * advantages.unsqueeze(1))
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * (torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1)
    return ((per_token_loss * completion_mask).sum(dim=1) / completion_mask.sum(dim=1)).mean()


# ---------------------------------------------------------------- losses


def get_loss(preset: str):
    """The loss a `grpo.loss` preset trains with."""
    return make_loss(LOSS_PRESETS[preset].objective, LOSS_PRESETS[preset].aggregation)


def _f32(x):
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("eps,eps_high,beta", CLIP_KL)
@pytest.mark.parametrize("use_old", [False, True])
def test_loss_matches_numpy(name, eps, eps_high, beta, use_old):
    x = _inputs()
    old = x["old"] if use_old else x["logp"]
    ref_jax = _f32(x["ref"]) if beta else None  # beta == 0 must work without a reference
    loss, metrics = get_loss(name)(
        _f32(x["logp"]),
        _f32(old) if use_old else None,
        ref_jax,
        _f32(x["adv"]),
        jnp.asarray(x["mask"], jnp.int32),
        epsilon=eps,
        epsilon_high=eps_high,
        beta=beta,
    )
    want_loss, want_metrics = np_loss(name, x["logp"], old, x["ref"], x["adv"], x["mask"], eps, eps_high, beta)
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5, atol=1e-6)
    assert set(metrics) == set(want_metrics)
    for key, want in want_metrics.items():
        np.testing.assert_allclose(float(metrics[key]), want, rtol=2e-5, atol=1e-6, err_msg=key)
    if use_old and name != "gspo":  # the random old logps hit both clip edges
        assert 0.0 < want_metrics["clip_ratio"] < 1.0 and 0.0 < want_metrics["clip_active_ratio"] < 1.0


def test_dr_grpo_uses_max_completion_length():
    x = _inputs(1)
    args = (_f32(x["logp"]), _f32(x["old"]), _f32(x["ref"]), _f32(x["adv"]), _f32(x["mask"]))
    loss, _ = get_loss("dr_grpo")(*args, beta=0.04, max_completion_length=40)
    want, _ = np_loss("dr_grpo", x["logp"], x["old"], x["ref"], x["adv"], x["mask"], 0.2, None, 0.04, max_len=40)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)


@pytest.mark.parametrize("eps,eps_high,beta", CLIP_KL)
@pytest.mark.parametrize("use_old", [False, True])
def test_grpo_gradient_matches_torch_vlmr1(eps, eps_high, beta, use_old):
    x = _inputs(2)
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in x.items()}
    logp_t = t["logp"].clone().requires_grad_(True)
    torch_loss = torch_vlmr1_compute_loss(
        logp_t, t["old"] if use_old else None, t["ref"], t["adv"], t["mask"], eps, eps_high, beta
    )
    torch_loss.backward()

    def loss_of(logp):
        old = _f32(x["old"]) if use_old else None
        return get_loss("grpo")(
            logp, old, _f32(x["ref"]), _f32(x["adv"]), _f32(x["mask"]), epsilon=eps, epsilon_high=eps_high, beta=beta
        )[0]

    loss, grad = jax.value_and_grad(loss_of)(_f32(x["logp"]))
    np.testing.assert_allclose(float(loss), torch_loss.item(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), logp_t.grad.numpy(), rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(grad)[x["mask"] == 0] == 0)


@pytest.mark.parametrize(
    "name,scale",
    [  # d loss / d logp[i, t] with old = stop_gradient(logp), beta = 0: -A_i * mask / scale
        ("grpo", lambda n, m: n[:, None] * B),
        ("gspo", lambda n, m: n[:, None] * B),
        ("dapo", lambda n, m: m.sum()),
        ("dr_grpo", lambda n, m: B * T),
    ],
)
def test_on_policy_gradient_closed_form(name, scale):
    x = _inputs(3)
    grad = jax.grad(lambda lp: get_loss(name)(lp, None, None, _f32(x["adv"]), _f32(x["mask"]), beta=0.0)[0])(
        _f32(x["logp"])
    )
    want = -x["adv"][:, None] * x["mask"] / scale(x["mask"].sum(axis=1), x["mask"])
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", LOSSES)
def test_loss_under_jit_equals_eager(name):
    x = _inputs(4)
    args = (_f32(x["logp"]), _f32(x["old"]), None, _f32(x["adv"]), _f32(x["mask"]))
    fn = partial(get_loss(name), epsilon=0.2, epsilon_high=0.28, beta=0.0)
    eager_loss, eager_metrics = fn(*args)
    jit_loss, jit_metrics = jax.jit(fn)(*args)
    np.testing.assert_allclose(float(jit_loss), float(eager_loss), rtol=1e-6)
    assert "kl" not in jit_metrics
    for key in eager_metrics:
        np.testing.assert_allclose(float(jit_metrics[key]), float(eager_metrics[key]), rtol=1e-6)


def test_loss_errors():
    x = _inputs()
    args = (_f32(x["logp"]), None, None, _f32(x["adv"]), _f32(x["mask"]))
    with pytest.raises(ValueError, match="ref_logp"):
        get_loss("grpo")(*args, beta=0.04)
    with pytest.raises(ValueError, match="advantages"):
        get_loss("grpo")(_f32(x["logp"]), None, None, _f32(x["adv"][:3]), _f32(x["mask"]), beta=0.0)
    with pytest.raises(ValueError, match=r"unknown objective 'ppo'.*ppo_clip"):
        make_loss("ppo")
    with pytest.raises(ValueError, match="already registered"):
        OBJECTIVES.register("gspo")(lambda *a, **k: None)


# ---------------------------------------------------------------- advantages


@pytest.mark.parametrize("g", [2, 3, 4])
@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_matches_numpy(g, scale):
    rewards = np.random.default_rng(g).uniform(0, 2, size=12)
    adv, std = group_advantages(jnp.asarray(rewards), g, "grpo" if scale else "dr_grpo")
    want_adv, want_std = np_group_advantages(rewards, g, scale)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(std), want_std, rtol=1e-5, atol=1e-7)
    torch_std = torch.tensor(rewards).view(-1, g).std(dim=1).numpy()
    np.testing.assert_allclose(np.asarray(std), torch_std, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("g", [3, 5, 6, 8])
def test_all_equal_group_gives_zero(g):
    values = [0.0, 0.1, 1 / 3, 0.7, 1.0, 2.3]
    rewards = np.concatenate([np.full(g, v) for v in values] + [np.arange(g, dtype=np.float64) ** 2])
    adv, std = group_advantages(jnp.asarray(rewards), g)
    n = g * len(values)
    assert np.all(np.asarray(adv)[:n] == 0.0) and np.all(np.asarray(std)[:-1] == 0.0)
    assert np.all(np.asarray(adv)[n:] != 0.0)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(jnp.zeros(7), 4)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(jnp.zeros(4), 1)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(jnp.zeros((2, 4)), 4)


# ---------------------------------------------------------------- masks and log-probs

IM_END, ENDOFTEXT = 151645, 151643


@pytest.mark.parametrize(
    "ids,eos,want",
    [
        ([5, 6, 7, 8], 151645, [1, 1, 1, 1]),  # no EOS: all ones
        ([IM_END, 6, 7, 8], IM_END, [1, 0, 0, 0]),  # EOS first: only the EOS token
        ([5, 6, IM_END, 8], IM_END, [1, 1, 1, 0]),  # EOS included, later tokens not
        ([5, 6, 7, IM_END], IM_END, [1, 1, 1, 1]),  # EOS last
        ([5, IM_END, IM_END, IM_END], IM_END, [1, 1, 0, 0]),  # padding with EOS
        ([5, ENDOFTEXT, IM_END, 8], [IM_END, ENDOFTEXT], [1, 1, 0, 0]),  # any id of the list, first one wins
        ([5, 6, ENDOFTEXT, 8], [IM_END], [1, 1, 1, 1]),  # ids not in the list are ordinary tokens
    ],
)
def test_completion_mask_table(ids, eos, want):
    mask = completion_mask(jnp.asarray([ids, ids[::-1]], jnp.int32), eos)
    assert mask.dtype == jnp.int32
    assert mask[0].tolist() == want


def test_completion_mask_batch_rows_independent():
    ids = jnp.asarray([[1, 9, 9, 9], [1, 2, 3, 4], [9, 1, 9, 1]], jnp.int32)
    assert completion_mask(ids, 9).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="empty"):
        completion_mask(ids, [])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_token_logprobs_matches_torch(dtype):
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=(2, 5, 37)) * 10.0 + 30.0).astype(np.float32)
    targets = rng.integers(0, 37, size=(2, 5))
    logits_in = jnp.asarray(logits).astype(dtype)
    got = token_logprobs(logits_in, jnp.asarray(targets, jnp.int32))
    assert got.dtype == jnp.float32
    ref_logits = torch.tensor(np.asarray(logits_in.astype(jnp.float32)), dtype=torch.float64)
    want = torch.log_softmax(ref_logits, dim=-1).gather(-1, torch.tensor(targets).unsqueeze(-1)).squeeze(-1)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-4)
