"""The grouped sampler (vlmr1_jax.rl.sampler) against independent references.

References: transformers' `generate(do_sample=False)` on the same tiny random checkpoint (images, left padding, two
EOS ids), numpy float64 softmax / top-k / top-p written from HF's TemperatureLogitsWarper -> TopKLogitsWarper ->
TopPLogitsWarper semantics (and the warpers themselves), chi-square tests on sample counts, and the train-time forward
(`completion_logprobs`) for the returned log-probs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from tests.helpers.hf_models import load_hf
from tests.helpers.prompts import PAD, device_prompts, hf_inputs
from tests.helpers.sampling import PROMPTS, chi2_pvalue, make_prompts, reference_probs
from vlmr1_jax.config import SamplingConfig
from vlmr1_jax.models.hf_weights import load_hf_model
from vlmr1_jax.rl.grpo import completion_mask
from vlmr1_jax.rl.prefix import prefill_fan_out
from vlmr1_jax.rl.sampler import Sampler, default_banned_ids, filter_logits, next_tokens
from vlmr1_jax.rl.step import make_logprob_fn


def first_eos(tokens: np.ndarray, eos) -> np.ndarray:
    """Index of each row's first EOS token, or the row length when there is none."""
    is_eos = np.isin(tokens, eos)
    return np.where(is_eos.any(1), is_eos.argmax(1), tokens.shape[1])


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_hf_model(tiny_hf_dir)


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    return load_hf(tiny_hf_dir)


@pytest.fixture(scope="module")
def prompts(model):
    return make_prompts(model.cfg)


# ---------------------------------------------------------------- the shared prefix (sampler and train forward)


def test_prefill_fan_out_matches_hf_last_prompt_logits(model, hf, prompts):
    """Each prompt's last-position logits from transformers, repeated to its G rows, with a cache of G identical
    rows per prompt sized for the completion, and the next M-RoPE position per row."""
    batch, pixels = prompts
    group, steps = 3, 5
    with torch.no_grad():
        expected = hf(**hf_inputs(batch, pixels, model.cfg)).logits[:, -1].double().numpy()
    graphdef, state = nnx.split(model)
    out = jax.device_get(
        jax.jit(lambda s, p: prefill_fan_out(nnx.merge(graphdef, s), p, group, steps))(state, device_prompts(batch))
    )
    np.testing.assert_allclose(out.logits, np.repeat(expected, group, axis=0), atol=2e-5, rtol=0)
    assert np.abs(np.diff(expected, axis=0)).max() > 1e-2  # the prompts' logits differ: a mixed-up row would fail
    np.testing.assert_array_equal(out.next_position, np.repeat(batch.next_position, group))
    length = batch.input_ids.shape[1]
    assert out.cache.k.shape[1:3] == (len(PROMPTS) * group, length + steps)
    for p in range(len(PROMPTS)):
        rows = slice(p * group, (p + 1) * group)
        np.testing.assert_array_equal(
            out.cache.valid[rows, :length], np.broadcast_to(batch.attention_mask[p].astype(bool), (group, length))
        )
        assert (np.diff(out.cache.k[:, rows], axis=1) == 0).all()
    assert not out.cache.valid[:, length:].any() and int(out.cache.index) == length


# ---------------------------------------------------------------- (a) greedy decoding equals HF generate

STEPS = 20
GROUP = 2


def _hf_greedy(hf, batch, pixels, cfg, eos: list[int]) -> np.ndarray:
    """HF greedy tokens [P, STEPS]; finished rows get PAD and a batch that stops early is padded with PAD."""
    with torch.no_grad():
        out = hf.generate(
            **hf_inputs(batch, pixels, cfg),
            do_sample=False,
            max_new_tokens=STEPS,
            eos_token_id=eos,
            pad_token_id=PAD,
            top_k=None,
            top_p=None,
            temperature=None,
        )
    new = out[:, batch.input_ids.shape[1] :].numpy()
    return np.pad(new, ((0, 0), (0, STEPS - new.shape[1])), constant_values=PAD)


def _pick_eos(tokens: np.ndarray) -> int:
    """A token that ends one row mid-way while another row runs on for 16+ steps, so EOS handling is exercised."""
    for t in dict.fromkeys(tokens.ravel().tolist()):
        first = [int(np.argmax(r == t)) if (r == t).any() else STEPS for r in tokens]
        if 2 <= min(first) <= STEPS - 3 and max(first) >= 16:
            return t
    raise AssertionError(f"no token of the greedy output can serve as a mid-way EOS:\n{tokens}")


@pytest.mark.parametrize("unstack", [True, False], ids=["layers-unstacked", "layers-stacked"])
def test_greedy_matches_hf_generate(model, hf, prompts, unstack):
    """Both decode loops (each layer's weights sliced once, as on XLA:CPU; the stack read in the loop, as on
    accelerators) give HF's greedy tokens."""
    batch, pixels = prompts
    cfg = model.cfg
    assert (batch.attention_mask == 0).any(), "the batch must contain left padding"
    free_run = _hf_greedy(hf, batch, pixels, cfg, eos=[cfg.eos_token_id])
    eos = [cfg.eos_token_id, _pick_eos(free_run)]
    expected = _hf_greedy(hf, batch, pixels, cfg, eos=eos)

    sampler = Sampler(
        SamplingConfig(max_new_tokens=STEPS, greedy=True), eos_ids=tuple(eos), pad_id=PAD, unstack_layers=unstack
    )
    graphdef, state = nnx.split(model)
    out = jax.device_get(sampler.jitted(graphdef, GROUP)(state, device_prompts(batch), jax.random.key(0)))

    tokens = out.tokens
    for g in range(GROUP):  # row p*G+g is sample g of prompt p; greedy samples of one prompt are identical
        np.testing.assert_array_equal(tokens[g::GROUP], expected)
    ends = first_eos(expected, eos)
    assert ends.min() < STEPS - 2 and ends.max() >= 16, ends  # one row stopped early, one ran 16+ steps
    np.testing.assert_array_equal(out.mask, (np.arange(STEPS) <= ends[:, None]).repeat(GROUP, axis=0))


# ---------------------------------------------------------------- (b) sampling frequencies: chi-square tests

# Hand-set probabilities (permuted so the sorted order is not the index order); top-p cut points stay clear of
# cumulative sums, which `reference_probs` asserts.
BASE_PROBS = np.array([0.30, 0.20, 0.15, 0.10, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01])[[3, 7, 0, 9, 5, 1, 8, 2, 6, 4]]
LOGITS = np.log(BASE_PROBS) + 1.7  # an offset: softmax is shift-invariant
DRAWS = 40_000
CONFIGS = [  # (temperature, top_k, top_p)
    (0.7, 0, 1.0),  # temperature only
    (1.0, 4, 1.0),  # top-k only
    (1.0, 0, 0.8),  # top-p only
    (1.6, 6, 0.75),  # all three, in HF's order
    (1.0, 50, 1.0),  # VLM-R1's effective setting: top_k 50 > vocab is a no-op
]


@pytest.mark.parametrize("temperature,top_k,top_p", CONFIGS)
def test_sampling_frequencies_follow_filtered_softmax(temperature, top_k, top_p):
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (DRAWS, LOGITS.size))
    draws = np.asarray(next_tokens(jax.random.key(1234), logits, cfg))
    counts = np.bincount(draws, minlength=LOGITS.size)
    probs = reference_probs(LOGITS, temperature, top_k, top_p)
    assert counts[probs == 0].sum() == 0, f"excluded tokens were sampled: {counts} vs {probs}"
    assert chi2_pvalue(counts, probs) > 1e-3, (counts / DRAWS, probs)
    # The test has power: the unfiltered, untempered softmax is rejected whenever it differs.
    if (temperature, top_k, top_p) != (1.0, 50, 1.0):
        plain = reference_probs(LOGITS, 1.0, 0, 1.0)
        assert counts[plain > 0].sum() == DRAWS and chi2_pvalue(counts, plain) < 1e-9


@pytest.mark.parametrize("temperature,top_k,top_p", CONFIGS + [(0.9, 3, 0.5), (1.0, 0, 0.3)])
def test_filter_logits_matches_hf_warpers(temperature, top_k, top_p):
    """The same kept set and renormalised probabilities as transformers' warpers on random logit rows."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(7).normal(0, 2.0, (64, 40)).astype(np.float32)
    scores = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits))
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    hf_probs = torch.softmax(scores, dim=-1).numpy()
    ours = np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(logits), temperature, top_k, top_p), axis=-1))
    np.testing.assert_array_equal(ours > 0, hf_probs > 0)
    np.testing.assert_allclose(ours, hf_probs, atol=1e-6)
    for row in range(0, 64, 16):  # and both agree with the float64 formula
        np.testing.assert_allclose(ours[row], reference_probs(logits[row], temperature, top_k, top_p), atol=1e-6)


# ---------------------------------------------------------------- (c) grouped sampling with EOS and banned ids


class CountingModel:
    """Forwards to the model and counts, at run time, how often the decoder runs (prefill + decode steps)."""

    def __init__(self, model, calls: list[int]):
        self.model, self.cfg, self.text, self.calls = model, model.cfg, model.text, calls

    def encode_vision(self, inputs):
        return self.model.encode_vision(inputs)

    def logits(self, hidden):
        return self.model.logits(hidden)

    def init_cache(self, batch, length):
        return self.model.init_cache(batch, length)

    def __call__(self, *args, **kwargs):
        jax.debug.callback(lambda: self.calls.append(1))
        return self.model(*args, **kwargs)


def test_grouped_sampling_eos_banned_and_logprobs(model, prompts):
    batch, _ = prompts
    cfg, vocab = model.cfg, model.cfg.text.vocab_size
    group, steps = 4, 12
    banned = default_banned_ids(cfg, extra=range(100, 150))  # a third of the vocabulary
    allowed = np.setdiff1d(np.arange(vocab), [*banned, PAD])
    eos = tuple(int(t) for t in allowed[::2])  # half the allowed tokens end a row: rows stop after a few steps
    sampler = Sampler(SamplingConfig(max_new_tokens=steps, top_k=0), eos_ids=eos, pad_id=PAD, banned_ids=banned)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    calls: list[int] = []
    run = jax.jit(
        lambda p, r, prompts, key: sampler.generate(
            CountingModel(nnx.merge(graphdef, p, r), calls), prompts, key, group
        )
    )
    prompts_dev = device_prompts(batch)
    out = jax.device_get(run(params, rest, prompts_dev, jax.random.key(3)))
    tokens, mask, logprobs = out.tokens, out.mask, out.logprobs
    rows = len(PROMPTS) * group
    assert tokens.shape == (rows, steps)

    assert not np.isin(tokens, banned).any(), tokens
    ends = first_eos(tokens, eos)
    for r in range(rows):  # mask through the first EOS, PAD after it
        np.testing.assert_array_equal(mask[r], np.arange(steps) <= ends[r])
        assert (tokens[r, ends[r] + 1 :] == PAD).all(), tokens[r]
    np.testing.assert_array_equal(mask, np.asarray(completion_mask(tokens, eos)))
    assert len(set(ends.tolist())) > 1, "rows should have different lengths"
    # Early stop: every row ended before max_new_tokens, and the decoder ran once per step until the last EOS.
    assert ends.max() < steps - 1
    assert len(calls) == 1 + ends.max() + 1, (len(calls), ends)
    # Samples of one prompt differ (independent keys per row).
    assert all(len({tuple(t) for t in tokens[p * group : (p + 1) * group]}) > 1 for p in range(len(PROMPTS)))

    forward = make_logprob_fn(graphdef, group)(params, rest, prompts_dev, jnp.asarray(tokens), jnp.asarray(mask))
    np.testing.assert_allclose(logprobs, np.asarray(forward) * mask, atol=1e-5)
    assert (logprobs[mask == 0] == 0).all()
    assert (logprobs[mask == 1] < 0).all()
