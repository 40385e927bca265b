"""Our JAX InternVL against transformers' InternVLForConditionalGeneration (fp32, eager attention): the vision
tower, the pixel shuffle, the visual tokens, prompt logits and cached decode steps of left-padded multi-tile batches
(tied and untied heads, LayerNorm / RMSNorm + q/k-norm towers, last and second-to-last hidden states), through
`ports.parity`'s rule max|ours - ref| <= atol + rtol * max|ref|; and one GRPO step on the 8-device mesh against the
single-device step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ports.parity import ATOL, RTOL, Diff
from tests.helpers.internvl_models import TINY, TINY_B, load_hf_internvl, save_random_internvl, tile_prompts
from tests.helpers.params import host_params
from tests.helpers.train import optimizer
from vlmr1_jax.config import GRPOConfig, MeshConfig
from vlmr1_jax.models.hf_weights import load_hf_model, read_config
from vlmr1_jax.models.internvl.config import from_hf_config
from vlmr1_jax.models.internvl.model import InternVL, pixel_shuffle
from vlmr1_jax.models.internvl.params import flat_paths
from vlmr1_jax.models.processor import PromptBatch
from vlmr1_jax.parallel.mesh import batch_sharding, create_sharded, make_mesh
from vlmr1_jax.processing.batch import to_device
from vlmr1_jax.rl.rollout import TrainExample
from vlmr1_jax.rl.state import init_train_state
from vlmr1_jax.rl.step import make_grpo_step

MARGIN = 10  # a correct fp32 port stays this far inside the tolerance
STEPS = 3  # cached decode steps compared


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_random_internvl(tmp_path_factory.mktemp("internvl_tiny"), TINY, seed=0)


@pytest.fixture(scope="module")
def tiny_b_dir(tmp_path_factory):
    return save_random_internvl(tmp_path_factory.mktemp("internvl_tiny_b"), TINY_B, seed=1)


def run_hf(model_dir, prompts, tiles: int, decode: np.ndarray):
    """transformers: visual tokens [tiles * tokens, D], prompt logits, one logits row per cached decode step, with
    our position ids passed explicitly."""
    model = load_hf_internvl(model_dir)
    t = torch.from_numpy
    pixels = t(prompts.pixel_values[:tiles])
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels).pooler_output
        mask = t(prompts.attention_mask)
        out = model(
            input_ids=t(prompts.input_ids),
            attention_mask=mask,
            pixel_values=pixels,
            position_ids=t(prompts.positions),
            use_cache=True,
        )
        logits, past, steps = out.logits.numpy(), out.cache, []
        next_pos = prompts.attention_mask.sum(1)
        for s in range(decode.shape[1]):
            mask = torch.cat([mask, torch.ones((len(decode), 1), dtype=mask.dtype)], dim=1)
            out = model(
                input_ids=t(decode[:, s : s + 1]),
                attention_mask=mask,
                position_ids=t((next_pos + s)[:, None]),
                cache=past,
                use_cache=True,
            )
            past = out.cache
            steps.append(out.logits[:, -1].numpy())
    return feats.reshape(-1, feats.shape[-1]).numpy(), logits, steps


def run_ours(model_dir, prompts, decode: np.ndarray):
    model = load_hf_model(model_dir)
    graphdef, state = nnx.split(model)
    feats = jax.jit(lambda state, px: nnx.merge(graphdef, state).encode_vision({"pixel_values": px}))(
        state, prompts.pixel_values
    )
    batch, length = prompts.input_ids.shape
    cache = model.init_cache(batch, length + decode.shape[1])

    @jax.jit
    def step(state, ids, pos, mask, gather, feats, cache):
        model = nnx.merge(graphdef, state)
        hidden, cache = model(ids, pos, mask, feats, gather, cache)
        return model.logits(hidden), cache

    logits, cache = step(
        state, prompts.input_ids, prompts.positions3(), prompts.attention_mask, prompts.gather, feats, cache
    )
    steps = []
    next_pos = prompts.attention_mask.sum(1)
    for s in range(decode.shape[1]):
        pos = np.broadcast_to((next_pos + s)[None, :, None], (3, batch, 1))
        out, cache = step(
            state, decode[:, s : s + 1], pos, np.ones((batch, 1), np.int32), np.full((batch, 1), -1), feats, cache
        )
        steps.append(np.asarray(out[:, 0]))
    return np.asarray(feats), np.asarray(logits), steps


CASES = {
    # (folder fixture, tiles of each image per row, zero pad tiles appended on our side)
    "untied, 1+3 | 2 tiles": ("tiny_dir", [[1, 3], [2]], 2),
    "untied, 1 | 1 | 5 tiles": ("tiny_dir", [[1], [], [5]], 0),
    "tied rms q/k-norm layer -2, 2 | 1+1 tiles": ("tiny_b_dir", [[2], [1, 1]], 1),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_and_cached_decode_match_transformers(case, request):
    fixture, tiles, pad_tiles = CASES[case]
    model_dir = request.getfixturevalue(fixture)
    cfg = read_config(model_dir)
    prompts = tile_prompts(cfg, tiles, seed=len(case), extra_tiles=pad_tiles)
    assert (prompts.attention_mask == 0).any(), "the batch must contain left padding"
    decode = np.random.default_rng(5).integers(2, 140, (len(tiles), STEPS))
    real = sum(map(sum, tiles))
    hf_feats, hf_logits, hf_steps = run_hf(model_dir, prompts, real, decode)
    feats, logits, steps = run_ours(model_dir, prompts, decode)
    assert feats.shape[0] == (real + pad_tiles) * cfg.num_image_token
    valid = prompts.attention_mask.astype(bool)
    diffs = [
        Diff.of("visual tokens", feats[: len(hf_feats)], hf_feats),
        Diff.of("prompt logits", logits[valid], hf_logits[valid]),
        *(Diff.of(f"decode step {i}", a, b) for i, (a, b) in enumerate(zip(steps, hf_steps))),
    ]
    print(*(d.line() for d in diffs), sep="\n")
    assert all(d.passed(RTOL / MARGIN, ATOL) for d in diffs), [d.line() for d in diffs]
    assert diffs[1].scale > 0.1 and diffs[0].scale > 0.1  # not a vacuous comparison


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_b_dir"])
def test_vision_tower_matches_transformers(fixture, request):
    """Our InternViT's output is the hidden state the config selects: the last block's, or the second-to-last
    (transformers' hidden_states[-2]); CLS token included."""
    model_dir = request.getfixturevalue(fixture)
    cfg = read_config(model_dir)
    pixels = np.random.default_rng(0).standard_normal((3, 3, cfg.vision.image_size, cfg.vision.image_size))
    pixels = pixels.astype(np.float32)
    with torch.no_grad():
        out = load_hf_internvl(model_dir).model.vision_tower(torch.from_numpy(pixels), output_hidden_states=True)
    ref = out.hidden_states[cfg.vision.feature_layer].numpy()
    graphdef, state = nnx.split(load_hf_model(model_dir))
    ours = np.asarray(jax.jit(lambda state, px: nnx.merge(graphdef, state).visual(px))(state, pixels))
    diff = Diff.of("vision tower", ours, ref)
    assert diff.passed(RTOL / MARGIN, ATOL) and diff.scale > 0.1, diff.line()
    if cfg.vision.feature_layer == -2:  # really the earlier state: the last block changes it
        assert not Diff.of("last", ours, out.last_hidden_state.numpy()).passed(RTOL, ATOL)


@pytest.mark.parametrize("grid, side", [(4, 2), (6, 2), (8, 4)])
def test_pixel_shuffle_orders_channels_as_transformers(grid, side, tiny_dir):
    """Exact equality with transformers' own `pixel_shuffle` on [tiles, grid, grid, C] features."""
    x = np.random.default_rng(grid).standard_normal((2, grid * grid, 5)).astype(np.float32)
    model = load_hf_internvl(tiny_dir)
    ref = model.model.pixel_shuffle(torch.from_numpy(x).reshape(2, grid, grid, 5), scale_factor=1 / side)
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x), side)), ref.reshape(2, -1, ref.shape[-1]))


def test_wrong_pixel_shape_is_one_clear_error(tiny_dir):
    model = load_hf_model(tiny_dir)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(2, 3, 448, 448\); .*\[tiles, 3, 56, 56\]"):
        model.encode_vision({"pixel_values": jnp.zeros((2, 3, 448, 448))})
    with pytest.raises(ValueError, match="InternVL's vision inputs are `pixel_values`"):
        model.encode_vision({"pixels": jnp.zeros((2, 3, 56, 56))})


# ---------------------------------------------------------------- one GRPO step: 8 devices == 1 device

G, T = 2, 5


def grpo_batch(cfg) -> tuple[PromptBatch, dict[str, np.ndarray]]:
    """Four prompts (1, 2, 0 and 1 tiles: 4 tiles split over data x fsdp = 4) built by hand in the processor's
    conventions, and G completions each with random advantages and reference log-probs."""
    p = tile_prompts(cfg, [[1], [2], [], [1]], seed=3, length=40)
    batch = PromptBatch(
        input_ids=p.input_ids.astype(np.int32),
        attention_mask=p.attention_mask.astype(np.int32),
        positions=p.positions3().astype(np.int32),
        next_position=p.attention_mask.sum(1).astype(np.int32),
        vision_gather=p.gather.astype(np.int32),
        vision={"pixel_values": p.pixel_values},
        image_grids=(((1,),), ((2,),), (), ((1,),)),
    )
    rng = np.random.default_rng(4)
    rows = 4 * G
    lengths = rng.integers(1, T + 1, rows)
    rest = {
        "tokens": rng.integers(2, 140, (rows, T)).astype(np.int32),
        "mask": (np.arange(T)[None] < lengths[:, None]).astype(np.int32),
        "advantages": rng.standard_normal(rows).astype(np.float32),
        "ref_logprobs": (-3.0 + 0.3 * rng.standard_normal((rows, T))).astype(np.float32),
    }
    return batch, rest


def one_step(model, batch, rest, mesh=None):
    tx, schedule = optimizer()
    graphdef, state = init_train_state(model, "full", tx, with_reference=True)
    step = make_grpo_step(graphdef, GRPOConfig(num_generations=G, beta=0.04, loss="grpo"), tx, schedule, 1)
    if mesh is None:
        example = TrainExample({k: jnp.asarray(v) for k, v in batch.arrays().items()}, **rest)
    else:
        put = lambda v: jax.device_put(v, batch_sharding(mesh, v.ndim))
        example = TrainExample(to_device(batch, mesh), **{k: put(v) for k, v in rest.items()})
    before = host_params(state.trainable)
    state, metrics = step(state, example)
    return before, host_params(state.trainable), float(metrics["loss"])


@pytest.mark.slow
def test_grpo_step_on_the_8_device_mesh_equals_the_single_device_step():
    cfg = from_hf_config(TINY_B)
    batch, rest = grpo_batch(cfg)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = create_sharded(lambda: InternVL(cfg, rngs=nnx.Rngs(0)), mesh)
    specs = {str(v[...].sharding.spec) for v in flat_paths(nnx.state(sharded)).values()}
    assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs), specs  # really sharded
    graphdef, state = nnx.split(sharded)
    single = nnx.merge(graphdef, jax.device_put(jax.device_get(state)))
    before, after, loss = one_step(single, batch, rest)
    before_m, after_m, loss_m = one_step(sharded, batch, rest, mesh)
    assert before_m.keys() == before.keys()
    np.testing.assert_allclose(loss_m, loss, atol=1e-6)
    worst = max(after, key=lambda k: np.abs(after[k] - after_m[k]).max())
    assert np.abs(after[worst] - after_m[worst]).max() <= 1e-5, worst
    moved = max(np.abs(after[k] - before[k]).max() for k in before)
    assert moved > 10 * 1e-5, "the update must be far larger than the tolerance"
    for path in ("visual.blocks.attn.q.kernel", "projector.fc1.kernel", "text.layers.mlp.up.kernel"):
        assert np.abs(after[path] - before[path]).max() > 1e-5, path  # every part trains


def test_scanned_and_unrolled_towers_agree_with_and_without_remat():
    """The second-to-last hidden state skips the last block by `lax.cond` when scanned and statically when unrolled;
    both, rematerialised or not, give the same visual tokens and gradients."""
    cfg = from_hf_config(TINY_B)
    pixels = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 84, 84)), jnp.float32)
    graphdef, state = nnx.split(InternVL(cfg, rngs=nnx.Rngs(0)))

    def tokens_and_grad(scan: bool, remat: str):
        model = nnx.merge(graphdef, state)
        model.set_scan_layers(scan)
        model.set_remat(remat)
        g, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.sum(jnp.sin(nnx.merge(g, p).encode_vision({"pixel_values": pixels})))
        return jax.jit(jax.value_and_grad(loss))(params)

    (ref, ref_grad), *others = [tokens_and_grad(s, r) for s, r in [(True, "none"), (False, "none"), (True, "full")]]
    ref_leaves = jax.tree.leaves(ref_grad)
    for value, grad in others:
        np.testing.assert_allclose(value, ref, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grad), ref_leaves, strict=True):
            # atol as the Qwen towers' scanned / unrolled gradients (test_train_step.py): the programs round apart
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    last = flat_paths(ref_grad)["visual.blocks.mlp.fc2.kernel"][...][-1]
    assert not np.asarray(last).any()  # the skipped last block gets no gradient
