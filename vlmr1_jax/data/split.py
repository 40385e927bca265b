"""The held-out validation split (`data.val_split_ratio`): which samples training never sees.

VLM-R1 splits its whole dataset (every file together) with `datasets.Dataset.train_test_split(test_size=ratio)`:
ceil(ratio * n) samples, the first ones of a numpy `default_rng` permutation, are held out. It passes no seed, so
its split follows numpy's global random state; ours is the same algorithm seeded with `data.seed`, so every
process and every resumed life of a run holds out the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from vlmr1_jax.data.jsonl import Sample


def held_out_indices(num_samples: int, ratio: float, seed: int) -> np.ndarray:
    """Indices of the validation samples: the first ceil(ratio * n) of a seeded permutation (sorted)."""
    if not 0 <= ratio < 1:
        raise ValueError(f"data.val_split_ratio={ratio!r}: expected a fraction in [0, 1)")
    if ratio == 0:
        return np.zeros(0, np.int64)
    count = math.ceil(ratio * num_samples)
    if count >= num_samples:
        raise ValueError(
            f"data.val_split_ratio={ratio} holds out {count} of the {num_samples} samples and leaves none for "
            f"training; lower data.val_split_ratio or add data"
        )
    return np.sort(np.random.default_rng(seed).permutation(num_samples)[:count])


def split_validation(samples: Sequence[Sample], ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(training samples, validation samples), each in file order; ratio 0 holds out nothing."""
    held = set(held_out_indices(len(samples), ratio, seed).tolist())
    train = [s for i, s in enumerate(samples) if i not in held]
    return train, [s for i, s in enumerate(samples) if i in held]
