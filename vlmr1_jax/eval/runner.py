"""The evaluation loop shared by `vlmr1 eval rec|ovd|math`: decode the samples not yet scored in batches, score
each batch and append it to the dataset's `RecordStore`, with a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tqdm import tqdm

from vlmr1_jax.data.jsonl import Sample
from vlmr1_jax.eval.rec import Frames
from vlmr1_jax.eval.store import RecordStore

Decoder = Callable[[Sequence[Sample]], tuple[list[str], list[Frames]]]  # completions and image frames of a batch
Scorer = Callable[[Sequence[Sample], Sequence[str], Sequence[Frames]], list[dict]]  # per-sample records


def _check_stored(records: dict[int, dict], samples: Sequence[Sample], where: str) -> None:
    """Stored records must be of these samples (same position, problem and solution)."""
    for index, record in records.items():
        sample = samples[index] if 0 <= index < len(samples) else None
        if sample is None or record.get("problem") != sample.problem or record.get("solution") != sample.solution:
            raise ValueError(
                f"{where}: record {index} is not of sample {index} of this evaluation subset; choose another --out "
                "or pass --overwrite"
            )


def score_dataset(
    samples: Sequence[Sample],
    store: RecordStore,
    decoder: Callable[[], Decoder],
    scorer: Scorer,
    *,
    batch_size: int,
    progress: bool = True,
    name: str = "",
) -> list[dict]:
    """Every sample's record, in subset order: stored ones are kept, the others decoded (`decoder()` is only
    called when some remain) and scored `batch_size` at a time, each batch stored before the next starts."""
    done = store.load()
    _check_stored(done, samples, str(store.path))
    pending = [i for i in range(len(samples)) if i not in done]
    with tqdm(total=len(samples), initial=len(samples) - len(pending), desc=name, disable=not progress) as bar:
        for start in range(0, len(pending), batch_size):
            indices = pending[start : start + batch_size]
            chunk = [samples[i] for i in indices]
            completions, frames = decoder()(chunk)
            records = [{"index": i, **r} for i, r in zip(indices, scorer(chunk, completions, frames))]
            store.append(records)
            done.update(zip(indices, records))
            bar.update(len(indices))
    return [done[i] for i in range(len(samples))]
