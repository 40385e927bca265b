"""The grain sample stream, cut into the trainer's batches: per-epoch permutations, dropped remainders, exact resume
and per-process slicing."""

from __future__ import annotations

import itertools

import pytest

from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.data.pipeline import batches_per_epoch, epoch_of, make_sample_iterator


def make_samples(n: int) -> list[Sample]:
    return [
        Sample(i, f"q{i}", f"<answer> {i} </answer>", (f"img/{i}.png",), "default", "d.jsonl", i + 1) for i in range(n)
    ]


def ids(batch: list[Sample]) -> list[int]:
    return [s.id for s in batch]


class Batches:
    """The trainer's view of a stream: consecutive batches of `size` samples (the last one may be short)."""

    def __init__(self, samples: list[Sample], batch_size: int, process_count: int = 1, **kwargs):
        self.stream = make_sample_iterator(samples, batch_size, process_count=process_count, **kwargs)
        self.size = batch_size // process_count

    def __iter__(self):
        return self

    def __next__(self) -> list[Sample]:
        batch = list(itertools.islice(self.stream, self.size))
        if not batch:
            raise StopIteration
        return batch

    def get_state(self):
        return self.stream.get_state()

    def set_state(self, state) -> None:
        self.stream.set_state(state)


def take(it, k: int) -> list[list[int]]:
    return [ids(next(it)) for _ in range(k)]


def test_each_epoch_is_a_fresh_permutation_with_the_remainder_dropped():
    n, b = 23, 5  # 4 full batches per epoch, 3 samples left out of each epoch
    batches = list(Batches(make_samples(n), b, seed=7, num_epochs=3))
    assert len(batches) == 3 * 4 and all(len(x) == b for x in batches)
    assert all(isinstance(s, Sample) and s.image_paths == (f"img/{s.id}.png",) for x in batches for s in x)
    epochs = [[i for x in batches[e * 4 : (e + 1) * 4] for i in ids(x)] for e in range(3)]
    for epoch in epochs:
        assert len(set(epoch)) == 20 and set(epoch) <= set(range(n))  # unique prompts within an epoch
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    assert epochs[0] != sorted(epochs[0])


def test_same_seed_same_order_other_seed_other_order():
    samples = make_samples(40)
    first = take(Batches(samples, 8, seed=3), 10)
    assert take(Batches(samples, 8, seed=3), 10) == first
    assert take(Batches(samples, 8, seed=4), 10) != first


def test_state_restores_exactly_in_a_fresh_iterator():
    samples = make_samples(30)
    reference = take(Batches(samples, 4, seed=11), 20)  # crosses two epoch boundaries
    it = Batches(samples, 4, seed=11)
    assert take(it, 9) == reference[:9]
    state = it.get_state()
    fresh = Batches(samples, 4, seed=11)
    fresh.set_state(state)
    assert take(fresh, 11) == reference[9:]


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_split_each_global_batch_disjointly_and_cover_it(process_count):
    samples, b, steps = make_samples(37), 8, 14  # 4 global batches per epoch; 14 steps cross 3 epoch boundaries
    global_batches = take(Batches(samples, b, seed=5), steps)
    local = [
        take(Batches(samples, b, seed=5, process_index=p, process_count=process_count), steps)
        for p in range(process_count)
    ]
    for step in range(steps):
        parts = [local[p][step] for p in range(process_count)]
        assert all(len(part) == b // process_count for part in parts)
        merged = list(itertools.chain(*parts))
        assert len(set(merged)) == b  # disjoint
        assert sorted(merged) == sorted(global_batches[step])  # covering: together they are the global batch


def test_per_process_state_restores():
    samples = make_samples(20)
    reference = take(Batches(samples, 4, seed=1, process_index=1, process_count=2), 8)
    it = Batches(samples, 4, seed=1, process_index=1, process_count=2)
    take(it, 3)
    fresh = Batches(samples, 4, seed=1, process_index=1, process_count=2)
    fresh.set_state(it.get_state())
    assert take(fresh, 5) == reference[3:]


def test_keeping_the_remainder_streams_every_sample():
    batches = list(Batches(make_samples(10), 4, seed=2, num_epochs=2, drop_remainder=False))
    assert [len(x) for x in batches] == [4, 4, 4, 4, 4]
    flat = [i for x in batches for i in ids(x)]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))


def test_epoch_bookkeeping_hand_computed():
    assert batches_per_epoch(23, 5) == 4.0
    assert batches_per_epoch(23, 5, drop_remainder=False) == 4.6
    assert epoch_of(0, 23, 5) == 0.0
    assert epoch_of(6, 23, 5) == 1.5
    assert epoch_of(8, 23, 5) == 2.0
    assert epoch_of(23, 23, 5, drop_remainder=False) == 5.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=6, process_count=4), "multiple of process_count"),
        (dict(batch_size=4, process_index=2, process_count=2), "process_index"),
        (dict(batch_size=20), "cannot fill one batch"),
        (dict(batch_size=4, seed=-1), "seed"),
        (dict(batch_size=4, process_count=2, drop_remainder=False), "single process"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_sample_iterator(make_samples(10), **kwargs)
