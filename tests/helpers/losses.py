"""Random per-token loss inputs (float64) for the GRPO math tests: log-probs, old / reference log-probs far enough
from them that both clip edges are hit, advantages, and a mask of the given completion lengths."""

from __future__ import annotations

import numpy as np


def loss_inputs(seed: int, lengths: np.ndarray, steps: int) -> dict[str, np.ndarray]:
    rows = len(lengths)
    rng = np.random.default_rng(seed)
    logp = -np.abs(rng.normal(size=(rows, steps))) * 2.0
    return {
        "logp": logp,
        "old": logp + 0.3 * rng.normal(size=(rows, steps)),
        "ref": logp + 0.2 * rng.normal(size=(rows, steps)),
        "adv": rng.normal(size=rows),
        "mask": (np.arange(steps)[None, :] < lengths[:, None]).astype(np.float64),
    }
