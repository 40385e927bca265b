"""`vlmr1 eval` end to end with fake decoders (no model): several datasets in one table, resuming after a crash
without recomputing anything scored, torn record lines, the output-folder rules, and the ovd / math commands."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.cli import run_cli
from vlmr1_jax.cli import evaluate
from vlmr1_jax.data.synthetic_ovd import generate as generate_ovd
from vlmr1_jax.eval.data import load_eval_samples
from vlmr1_jax.eval.store import RecordStore
from vlmr1_jax.models.family import get_family


class FakeDecoder:
    """Answers each sample with `answer(sample)`; frames None (no rescale); raises on call number `crash_on`."""

    def __init__(self, answer, crash_on: int | None = None):
        self.answer, self.crash_on, self.calls, self.seen = answer, crash_on, 0, []

    def __call__(self, samples: Sequence):
        self.calls += 1
        if self.calls == self.crash_on:
            raise RuntimeError("killed mid-evaluation")
        self.seen += [s.problem for s in samples]
        return [self.answer(s) for s in samples], [[None] * len(s.image_paths) for s in samples]


def rec_answer(sample) -> str:
    """The truth box for even objects, a box off by 10 px for odd ones (a miss on these small boxes)."""
    k = int(sample.problem.split()[-1])
    x1, y1, x2, y2 = json.loads(sample.solution.removeprefix("<answer> ").removesuffix(" </answer>"))
    shift = 0 if k % 2 == 0 else 10
    return (
        f'<think>t</think><answer>{{"bbox_2d": [{int(x1) + shift}, {int(y1)}, {int(x2) + shift}, {int(y2)}]}}</answer>'
    )


@pytest.fixture
def use_decoder(monkeypatch):
    """Replace the JAX decoder by `decoder`; returns the list of decoders the CLI asks for from now on."""

    def install(decoder):
        built = []

        def build(*_args):
            built.append(decoder)
            return decoder

        monkeypatch.setattr(evaluate, "jax_decoder", build)
        monkeypatch.setattr(evaluate, "model_family", lambda *_: get_family("qwen2_5_vl"))  # no model to read
        return built

    return install


@pytest.fixture
def rec_files(tmp_path) -> list[str]:
    """Two VLM-R1 eval lists (10 and 5 items, 8 x 8 boxes) over one image folder."""
    images = tmp_path / "images"
    images.mkdir()
    files = []
    for name, n in (("refcoco_val", 10), ("lisa_test", 5)):
        items = []
        for k in range(n):
            Image.new("RGB", (40, 30)).save(images / f"{name}_{k}.png")
            items.append({"image": f"{name}_{k}.png", "problem": f"{name} object {k}", "solution": [k, 2, k + 8, 10]})
        (tmp_path / f"{name}.json").write_text(json.dumps(items))
        files.append(str(tmp_path / f"{name}.json"))
    return files


def eval_rec(files: list[str], out: Path, *extra: object) -> int:
    data = [arg for f in files for arg in ("--data", f)]
    images = Path(files[0]).parent / "images"
    return run_cli(
        "eval",
        "rec",
        "--model",
        "m",
        *data,
        "--image-root",
        images,
        "--out",
        out,
        "--batch-size",
        4,
        "--no-progress",
        *extra,
    )


def results(out: Path, name: str) -> dict:
    return json.loads((out / f"rec_results_{name}.json").read_text())


def test_several_datasets_one_table_and_resume_after_a_crash(rec_files, use_decoder, tmp_path, capsys):
    reference = FakeDecoder(rec_answer)
    use_decoder(reference)
    assert eval_rec(rec_files, tmp_path / "reference") == 0
    table = (tmp_path / "reference" / "results.md").read_text()
    assert re.search(r"\| refcoco_val \| 10 \| 50\.00 \| 0\.5000 \|", table)  # 5 even of 10 exact, 5 missed
    assert re.search(r"\| lisa_test \| 5 \| 60\.00 \|", table) and table in capsys.readouterr().out

    # Killed during the second batch of refcoco_val: the first batch (4 samples) is on disk.
    out = tmp_path / "run"
    use_decoder(FakeDecoder(rec_answer, crash_on=2))
    assert eval_rec(rec_files, out) == 1
    assert "killed mid-evaluation" in capsys.readouterr().err
    assert len(RecordStore(out, "refcoco_val").load()) == 4

    resumed = FakeDecoder(rec_answer)
    use_decoder(resumed)
    assert eval_rec(rec_files, out) == 0
    subset = [s.problem for s in load_eval_samples(rec_files[0], str(tmp_path / "images"), limit=2000)]
    first_batch = subset[:4]
    assert not set(first_batch) & set(resumed.seen)  # nothing scored before is decoded again
    assert sorted(resumed.seen) == sorted(subset[4:] + [f"lisa_test object {k}" for k in range(5)])
    for name in ("refcoco_val", "lisa_test"):
        assert results(out, name)["results"] == results(tmp_path / "reference", name)["results"]
    assert (out / "results.md").read_text() == table

    # A finished evaluation re-run decodes nothing (the model is never even loaded).
    built = use_decoder(FakeDecoder(rec_answer))
    assert eval_rec(rec_files, out) == 0 and built == []


def test_torn_and_corrupt_record_lines_are_dropped(tmp_path):
    store = RecordStore(tmp_path, "ds")
    store.append([{"index": 0, "x": 1.5}, {"index": 1, "x": 2.5}])
    store.append([{"index": 2, "x": 3.5}])
    lines = store.path.read_bytes().splitlines(keepends=True)
    corrupt = lines[1].replace(b"2.5", b"9.5")  # the checksum no longer matches
    store.path.write_bytes(lines[0] + corrupt + lines[2] + lines[0][:25])  # and a write cut short
    assert store.load() == {0: {"index": 0, "x": 1.5}, 2: {"index": 2, "x": 3.5}}
    assert store.path.read_bytes() == lines[0] + lines[2]  # rewritten without them: their samples rerun


def test_output_folder_rules(rec_files, use_decoder, tmp_path, capsys):
    use_decoder(FakeDecoder(rec_answer))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert eval_rec(rec_files, mine) == 1 and eval_rec(rec_files, mine, "--overwrite") == 1
    assert "not a folder vlmr1 eval wrote" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    out = tmp_path / "out"
    assert eval_rec(rec_files, out) == 0
    assert eval_rec(rec_files, out, "--protocol", "baseline") == 1
    assert "protocol: 'r1' -> 'baseline'" in capsys.readouterr().err
    assert eval_rec(rec_files, out, "--protocol", "baseline", "--overwrite") == 0
    assert results(out, "refcoco_val")["settings"]["protocol"] == "baseline"
    Path(rec_files[1]).write_text(Path(rec_files[1]).read_text().replace("object 4", "object 4 changed"))
    assert eval_rec(rec_files, out, "--protocol", "baseline") == 1
    assert "lisa_test.sha256" in capsys.readouterr().err


def test_eval_ovd_and_math_commands(use_decoder, tmp_path, capsys):
    data = generate_ovd(str(tmp_path / "ovd"), 6, seed=1, split="val")
    truths = {s.problem: s.solution for s in load_eval_samples(data, str(tmp_path / "ovd" / "images"), None)}
    use_decoder(FakeDecoder(lambda s: f"<think>x</think>{truths[s.problem]}"))  # the truth, word for word
    out = tmp_path / "ovd_out"
    argv = ("eval", "ovd", "--model", "m", "--data", data, "--image-root", tmp_path / "ovd" / "images")
    assert run_cli(*argv, "--out", out, "--no-progress") == 0
    summary = json.loads((out / "results.json").read_text())["datasets"]["val"]
    assert summary["map"] == pytest.approx(100.0) and summary["nms_map"] == pytest.approx(100.0)
    assert summary["n"] == 6 and summary["truth_boxes"] == summary["predicted_boxes"] > 0
    assert json.loads((out / "eval_settings.json").read_text())["settings"]["task_type"] == "odLength"
    capsys.readouterr()

    bench = tmp_path / "bench.jsonl"
    lines = [
        {"conversations": [{"from": "human", "value": "1+1?"}, {"from": "gpt", "value": "2"}]},
        {"conversations": [{"from": "human", "value": "Pick: A. 3 B. 4"}, {"from": "gpt", "value": "B"}]},
        {"conversations": [{"from": "human", "value": "2*3?"}, {"from": "gpt", "value": "6"}]},
    ]
    bench.write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = {"1+1?": "<answer>2</answer>", "Pick: A. 3 B. 4": "<answer>B</answer>", "2*3?": "<answer>5</answer>"}
    use_decoder(FakeDecoder(lambda s: answers[s.problem]))
    assert run_cli("eval", "math", "--model", "m", "--data", bench, "--out", tmp_path / "math", "--no-progress") == 0
    assert "| bench | 3 | 66.67 |" in capsys.readouterr().out
