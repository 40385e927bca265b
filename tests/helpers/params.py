"""Parameters of a model or state as host numpy arrays, and their bit-exact comparison."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from vlmr1_jax.models.qwen2_5_vl.params import flat_paths


def host_params(tree: nnx.Module | nnx.State, dtype: np.dtype | None = None) -> dict[str, np.ndarray]:
    """Every variable of a model (or of a state) by dotted path, copied to the host (a copy: a later step may donate
    the device buffers), cast to `dtype` if given."""
    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree
    return {path: np.array(jax.device_get(var[...]), dtype) for path, var in flat_paths(state).items()}


def assert_same_params(a: nnx.Module | nnx.State, b: nnx.Module | nnx.State) -> None:
    """Same paths, dtypes and values, bit for bit."""
    pa, pb = host_params(a), host_params(b)
    assert pa.keys() == pb.keys()
    for path in pa:
        assert pa[path].dtype == pb[path].dtype, path
        np.testing.assert_array_equal(pa[path], pb[path], err_msg=path)
