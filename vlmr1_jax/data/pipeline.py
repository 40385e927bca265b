"""The sample stream the trainer draws its batches from: a grain pipeline with a per-epoch shuffle, per-process
slicing and exact resume.

Order of operations: source -> shuffle(seed) -> keep whole global batches of each epoch -> repeat(num_epochs) ->
slice [process_index::process_count]. Like VLM-R1's `RepeatRandomSampler`, every epoch is a fresh permutation cut
into global batches of unique prompts, and an incomplete final batch of each epoch is dropped. Global batch `s` is
stream positions [s*B, (s+1)*B); process p reads every `process_count`-th position. The stream yields one sample
at a time, so a sample that fails when its images are read can be replaced by the next one: the stream position
alone (checkpointed) then decides every batch, and resume stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain

from vlmr1_jax.data.jsonl import Sample


def batches_per_epoch(num_samples: int, batch_size: int, drop_remainder: bool = True) -> float:
    """Optimizer steps (global batches) in one epoch; fractional when batches straddle epochs."""
    if drop_remainder:
        return float(num_samples // batch_size)
    return num_samples / batch_size


def epoch_of(steps_done: int, num_samples: int, batch_size: int, drop_remainder: bool = True) -> float:
    """Epochs completed after `steps_done` global batches (HF-style fractional `epoch` for logging)."""
    return steps_done / batches_per_epoch(num_samples, batch_size, drop_remainder)


def _check_stream_args(
    n: int, batch_size: int, seed: int, process_index: int, process_count: int, drop_remainder: bool
) -> None:
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if drop_remainder and n < batch_size:
        raise ValueError(f"{n} samples cannot fill one batch of {batch_size} prompts")
    if not drop_remainder and (process_count > 1 or n == 0):
        raise ValueError("drop_remainder=False needs a single process and at least one sample")


def make_sample_dataset(
    samples: Sequence[Sample],
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
) -> grain.MapDataset:
    """This process's samples in stream order (`batch_size` is the global batch the epochs are cut into).

    Each process reads `batch_size // process_count` samples per step. `drop_remainder=False` keeps every sample
    (batches then straddle epochs, and the last one may be short); it is single-process only, since a short tail
    would give processes different numbers of steps.
    """
    _check_stream_args(len(samples), batch_size, seed, process_index, process_count, drop_remainder)
    n = len(samples)
    ds = grain.MapDataset.source(list(samples)).shuffle(seed=seed)
    if drop_remainder:
        ds = ds[: (n // batch_size) * batch_size]  # slicing after shuffle keeps the per-epoch reshuffle
    return ds.repeat(num_epochs)[process_index::process_count]


def make_sample_iterator(
    samples: Sequence[Sample],
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
) -> grain.DatasetIterator:
    """A resumable iterator over `make_sample_dataset`; `get_state()` / `set_state()` restore it exactly. Read
    synchronously (no threads): the elements are in memory and images are still paths."""
    ds = make_sample_dataset(samples, batch_size, seed, num_epochs, process_index, process_count, drop_remainder)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
