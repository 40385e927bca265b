"""The fast decode path of the grouped sampler against independent references.

Multi-source attention (a prompt's keys stored once for its G rows) against numpy softmax attention over each row's
concatenated keys; the grouped decode cache against transformers' forward of the full prompt + completion rows;
unstacked layers against the stacked model; top-k sampling on the k kept tokens against the float64 filtered
softmax when the k-th logit ties (the fallback) and within the top-p set; `vlmr1 train --profile` writes a trace.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.helpers.cli import run_cli
from tests.helpers.hf_models import load_hf
from tests.helpers.prompts import device_prompts, hf_inputs
from tests.helpers.runs import TINY_RUN, make_run_inputs
from tests.helpers.sampling import PROMPTS, chi2_pvalue, make_prompts, reference_probs
from vlmr1_jax.config import SamplingConfig
from vlmr1_jax.models.hf_weights import load_hf_model
from vlmr1_jax.models.layers import attend, unstack_layers
from vlmr1_jax.rl.prefix import prefill
from vlmr1_jax.rl.sampler import next_tokens
from vlmr1_jax.train.profile import parse_steps


def test_attend_shared_prefix_matches_formula():
    """Rows 0-2 read prompt 0's keys, rows 3-5 prompt 1's, plus their own keys: one softmax over both."""
    keys = jax.random.split(jax.random.key(0), 8)
    prompts, group, length, prefix, own = 2, 3, 2, 7, 5
    q = jax.random.normal(keys[0], (prompts * group, length, 4, 8))
    pk, pv = (jax.random.normal(k, (prompts, prefix, 2, 8)) for k in keys[1:3])
    ok, ov = (jax.random.normal(k, (prompts * group, own, 2, 8)) for k in keys[3:5])
    pmask = jax.random.bernoulli(keys[5], 0.7, (prompts * group, 1, prefix)).at[..., 0].set(True)
    omask = jax.random.bernoulli(keys[6], 0.6, (prompts * group, length, own))
    out = attend(q, [(pk, pv, pmask), (ok, ov, omask)])
    # float64 reference: each row's keys = its prompt's keys then its own, query head h reads KV head h // 2
    rep = lambda t, axis: np.repeat(np.asarray(t, np.float64), group if axis == 0 else 2, axis=axis)
    k = rep(np.concatenate([rep(pk, 0), ok], axis=1), 2)
    v = rep(np.concatenate([rep(pv, 0), ov], axis=1), 2)
    mask = np.concatenate([np.broadcast_to(pmask, (prompts * group, length, prefix)), omask], axis=-1)
    scores = np.einsum("blhd,bshd->bhls", np.asarray(q, np.float64), k) / np.sqrt(8)
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bhls,bshd->blhd", probs / probs.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=0)


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_hf_model(tiny_hf_dir)


def test_group_cache_decode_matches_hf_forward(model, tiny_hf_dir):
    """Prompts prefilled once, shared by G rows that each decode their own tokens (two at once, then one by one):
    every position's logits equal transformers' forward of the full prompt + completion rows."""
    batch, pixels = make_prompts(model.cfg)
    group, completion = (
        2,
        np.array(
            [[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13, 14], [15, 16, 17, 18], [3, 9, 27, 81], [20, 21, 22, 23]],
            np.int32,
        ),
    )
    rows = len(PROMPTS) * group
    graphdef, state = nnx.split(model)

    def run(state, prompts, tokens):
        m = nnx.merge(graphdef, state)
        _, cache, next_position = prefill(m, prompts, 0)
        cache = cache.share(group, tokens.shape[1])
        decoder = unstack_layers(m)
        positions = jnp.repeat(next_position, group)[:, None] + jnp.arange(tokens.shape[1])
        logits = []
        for start, stop in ((0, 2), (2, 3), (3, 4)):
            pos = jnp.broadcast_to(positions[None, :, start:stop], (3, rows, stop - start))
            hidden, cache = decoder(tokens[:, start:stop], pos, jnp.ones((rows, stop - start), jnp.int32), cache=cache)
            logits.append(decoder.logits(hidden))
        return jnp.concatenate(logits, axis=1)

    ours = np.asarray(jax.jit(run)(state, device_prompts(batch), jnp.asarray(completion)))
    inputs = hf_inputs(batch, pixels, model.cfg, group, completion, np.ones_like(completion))
    with torch.no_grad():
        expected = load_hf(tiny_hf_dir)(**inputs).logits[:, -completion.shape[1] :].double().numpy()
    np.testing.assert_allclose(ours, expected, atol=3e-5, rtol=0)
    assert np.abs(ours[0] - ours[1]).max() > 1e-2  # two samples of one prompt differ: no row mixed up


# ---------------------------------------------------------------- top-k sampling on the kept set

DRAWS = 40_000


@pytest.mark.parametrize(
    "logits,top_k,top_p",
    [
        ([2.0, 1.0, 1.0, 1.0, 0.5, 0.2, -1.0, 0.0], 2, 1.0),  # three tokens tie at the k-th value: all kept
        ([2.0, 1.3, 1.0, 1.0, 0.5, 0.2, -1.0, 0.0], 5, 0.72),  # top-p cuts between two tied tokens: index order
        ([2.0, 1.3, 1.0, 0.7, 0.5, 0.2, -1.0, 0.0], 3, 0.9),  # no tie: the kept-set path, top-k then top-p
    ],
)
def test_top_k_sampling_follows_filtered_softmax(logits, top_k, top_p):
    logits = np.asarray(logits, np.float32)
    cfg = SamplingConfig(temperature=0.8, top_k=top_k, top_p=top_p)
    draws = np.asarray(next_tokens(jax.random.key(5), jnp.broadcast_to(jnp.asarray(logits), (DRAWS, logits.size)), cfg))
    counts = np.bincount(draws, minlength=logits.size)
    probs = reference_probs(logits, 0.8, top_k, top_p)
    assert counts[probs == 0].sum() == 0, (counts, probs)
    assert chi2_pvalue(counts, probs) > 1e-3, (counts / DRAWS, probs)


# ---------------------------------------------------------------- vlmr1 train --profile


def test_profile_steps_parse_and_errors():
    assert parse_steps("2:3") == (2, 3) and parse_steps("4") == (4, 4)
    for bad in ("0:2", "3:2", "a:b"):
        with pytest.raises(ValueError, match="--profile-steps"):
            parse_steps(bad)


@pytest.mark.slow
def test_train_profile_writes_a_trace(tmp_path):
    overrides = make_run_inputs(tmp_path / "data")
    out, trace = tmp_path / "run", tmp_path / "trace"
    argv = [*overrides, *TINY_RUN, "train.max_steps=1", f"train.output_dir={out}"]
    assert run_cli("train", "demo_tiny", *argv, "--no-progress", "--profile", trace, "--profile-steps", "1:1") == 0
    assert list(trace.rglob("*.xplane.pb")), sorted(trace.rglob("*"))
