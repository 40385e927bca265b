"""`model.init`: transformers' std-0.02 init, or linear kernels at std 1/sqrt(fan_in) for training small models
from scratch; checked by the standard deviations of the built model's weights, drawn from the same seed."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from vlmr1_jax.config import ModelConfig, RunConfig, TrainConfig, validate
from vlmr1_jax.train.setup import build_model, load_tokenizer, setup_mesh


def weights(init: str) -> dict[tuple, np.ndarray]:
    cfg = RunConfig(model=ModelConfig(preset="tiny", init=init), train=TrainConfig(seed=3))
    model = build_model(cfg, load_tokenizer(cfg), setup_mesh(cfg))
    return {path: np.asarray(node.get_value()) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


def test_fan_in_init_rescales_every_linear_kernel_and_keeps_the_rest():
    hf, fan_in = weights("hf"), weights("fan_in")
    assert hf.keys() == fan_in.keys()
    kernels = [p for p in hf if p[-1] in ("kernel", "patch_embed")]
    assert len(kernels) >= 10
    for path in kernels:
        fan = hf[path].shape[-2]
        assert np.std(hf[path]) == pytest.approx(0.02, rel=0.1), path
        np.testing.assert_allclose(fan_in[path], hf[path] / (0.02 * np.sqrt(fan)), rtol=1e-5, err_msg=str(path))
        assert np.std(fan_in[path]) == pytest.approx(1 / np.sqrt(fan), rel=0.1), path
    for path in hf.keys() - set(kernels):  # embeddings, norms, biases: untouched
        np.testing.assert_array_equal(fan_in[path], hf[path], err_msg=str(path))
    assert any(p[-1] == "embed" for p in hf.keys() - set(kernels))


def test_an_unknown_init_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"model\.init.*'lecun'.*one of \('hf', 'fan_in'\)"):
        validate(RunConfig(model=ModelConfig(init="lecun")))
