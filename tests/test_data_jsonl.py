"""VLM-R1 jsonl loading, bad-input errors, skip-mode reports and the `vlmr1 data` commands."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.cli import PROBLEM_LINE, run_cli
from vlmr1_jax.data import synthetic
from vlmr1_jax.data.jsonl import DataError, Sample, load_jsonl_datasets, read_image_sizes


def conv(question, answer) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_jsonl(path, lines) -> str:
    """Each line: a dict (dumped), a str (written as is) or bytes (raw)."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


@pytest.fixture
def images(tmp_path) -> str:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 6), (10, 20, 30)).save(folder / "a.png")
    Image.new("RGB", (5, 7), (1, 2, 3)).save(folder / "sub" / "b.png")
    (tmp_path / "outside.png").write_bytes((folder / "a.png").read_bytes())
    return str(folder)


def test_normalisation_matches_vlm_r1(tmp_path, images):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"id": 1, "image": "a.png", "conversations": conv("<image>What is this?", " <answer>cat</answer> ")},
            {
                "id": "x",
                "image": ["a.png", "sub/b.png"],
                "accu_reward_method": "mcq",
                "conversations": conv("<image><image>Compare <image>them", "3"),
            },
            "",
            {"conversations": conv("Text only", "[1, 2]"), "difficulty": "easy"},
            {"id": 4, "image": "sub/../a.png", "conversations": conv("<image>Q", "<answer>  A B\n</answer>")},
        ],
    )
    samples, report = load_jsonl_datasets(path, images)
    a, b = os.path.join(images, "a.png"), os.path.join(images, "sub", "b.png")
    assert samples == [
        Sample(1, "What is this?", "<answer> cat </answer>", (a,), "default", path, 1, {}),
        Sample("x", "Compare them", "<answer> 3 </answer>", (a, b), "mcq", path, 2, {}),
        Sample(None, "Text only", "<answer> [1, 2] </answer>", (), "default", path, 4, {"difficulty": "easy"}),
        Sample(4, "Q", "<answer> A B </answer>", (a,), "default", path, 5, {}),
    ]
    assert (report.lines, report.loaded, report.problems) == (4, 4, [])


def test_colon_separated_files_folders_and_reward_methods(tmp_path, images):
    f1 = write_jsonl(tmp_path / "one.jsonl", [{"id": 1, "image": "a.png", "conversations": conv("q1", "a1")}])
    f2 = write_jsonl(
        tmp_path / "two.jsonl",
        [
            {"id": 2, "image": "b.png", "conversations": conv("q2", "a2")},
            {"id": 3, "accu_reward_method": "override", "conversations": conv("q3", "a3")},
        ],
    )
    sub = os.path.join(images, "sub")
    samples, _ = load_jsonl_datasets(f"{f1}:{f2}", f"{images}:{sub}", "iou:acc")
    assert [(s.id, s.accu_reward_method, s.image_paths, s.source) for s in samples] == [
        (1, "iou", (os.path.join(images, "a.png"),), f1),
        (2, "acc", (os.path.join(sub, "b.png"),), f2),
        (3, "override", (), f2),
    ]
    # The list form is the same thing already split.
    assert load_jsonl_datasets([f1, f2], [images, sub], ["iou", "acc"])[0] == samples


@pytest.mark.parametrize(
    "files, folders, methods, word",
    [
        ("a.jsonl:b.jsonl", "x", None, "image_folders"),
        ("a.jsonl", "x:y", None, "image_folders"),
        ("a.jsonl:b.jsonl", "x:y", "iou", "reward_method"),
    ],
)
def test_length_mismatch_is_a_clear_value_error(files, folders, methods, word):
    with pytest.raises(ValueError, match=word):
        load_jsonl_datasets(files, folders, methods)


GOOD = {"id": 0, "image": "a.png", "conversations": conv("<image>q", "a")}
BAD_LINES = [  # (line, kind, field)
    ("{not json", "invalid_json", "<line>"),
    ("[1, 2]", "wrong_type", "<line>"),
    ({"image": "a.png"}, "missing_key", "conversations"),
    ({"conversations": {"from": "human"}}, "wrong_type", "conversations"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "missing_key", "conversations[1]"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, "missing_key", "conversations[0].value"),
    ({"conversations": ["q", {"value": "a"}]}, "wrong_type", "conversations[0]"),
    ({"conversations": conv(7, "a")}, "wrong_type", "conversations[0].value"),
    ({"conversations": [{"value": "q"}, {"from": "gpt"}]}, "missing_key", "conversations[1].value"),
    ({"conversations": conv("q", None)}, "wrong_type", "conversations[1].value"),
    ("[" * 100_000 + "]" * 100_000, "invalid_json", "<line>"),
    ({"image": 5, "conversations": conv("q", "a")}, "wrong_type", "image"),
    ({"image": ["a.png", 3], "conversations": conv("q", "a")}, "wrong_type", "image[1]"),
    ({"accu_reward_method": 5, "conversations": conv("q", "a")}, "wrong_type", "accu_reward_method"),
    ({"image": "missing.png", "conversations": conv("q", "a")}, "missing_image", "image"),
    ({"image": ["a.png", "sub/nope.png"], "conversations": conv("q", "a")}, "missing_image", "image[1]"),
    ({"image": "/etc/hostname", "conversations": conv("q", "a")}, "unsafe_path", "image"),
    ({"image": "../outside.png", "conversations": conv("q", "a")}, "unsafe_path", "image"),
    ({"image": "sub/../../outside.png", "conversations": conv("q", "a")}, "unsafe_path", "image"),
    (b'{"conversations": [{"value": "caf\xe9"}, {"value": "a"}]}', "non_utf8", "<line>"),
]


@pytest.mark.parametrize("bad, kind, field", BAD_LINES)
def test_each_bad_input_raises_a_located_data_error(tmp_path, images, bad, kind, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        load_jsonl_datasets(path, images)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.kind, err.file, err.line, err.field) == (kind, path, 2, field)
    assert f"{path}:2:" in str(err) and f"'{field}'" in str(err)


def test_skip_mode_counts_every_skipped_sample_by_kind(tmp_path, images):
    lines = [GOOD] + [bad for bad, _, _ in BAD_LINES] + [GOOD]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    samples, report = load_jsonl_datasets(path, images, on_error="skip")
    assert [s.line for s in samples] == [1, len(lines)]
    expected: dict[str, int] = {}
    for _, kind, _ in BAD_LINES:
        expected[kind] = expected.get(kind, 0) + 1
    assert report.counts_by_kind() == dict(sorted(expected.items()))
    assert [p.line for p in report.problems] == list(range(2, len(lines)))
    assert (report.lines, report.loaded) == (len(lines), 2)
    summary = report.summary()
    assert f"{len(BAD_LINES)} problem(s)" in summary
    assert all(f"{kind}: {n}" in summary for kind, n in expected.items())
    assert f"{path}:2:" in summary


def test_images_are_not_checked_when_asked_not_to(tmp_path, images):
    path = write_jsonl(tmp_path / "d.jsonl", [{"image": "missing.png", "conversations": conv("q", "a")}])
    samples, _ = load_jsonl_datasets(path, images, check_images=False)
    assert samples[0].image_paths == (os.path.join(images, "missing.png"),)


def test_read_image_sizes_decodes_and_reports_unreadable(tmp_path, images):
    good = Sample(
        0, "q", "a", (os.path.join(images, "a.png"), os.path.join(images, "sub", "b.png")), "default", "f.jsonl", 3
    )
    assert read_image_sizes(good) == [(6, 8), (7, 5)]  # (height, width)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "images" / "a.png").read_bytes()[:40])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    for path in (truncated, garbage):
        with pytest.raises(DataError) as info:
            read_image_sizes(Sample(0, "q", "a", (str(path),), "default", "f.jsonl", 3))
        assert (info.value.kind, info.value.line, info.value.field) == ("unreadable_image", 3, "image")


def test_synth_then_check_passes(tmp_path, capsys):
    out = str(tmp_path / "syn")
    assert run_cli("data", "synth", "--out", out, "--n", "6", "--seed", "1") == 0
    folder = synthetic.image_folder(out)
    assert run_cli("data", "check", "--data-files", f"{out}/train.jsonl", "--image-folders", folder) == 0
    text = capsys.readouterr().out
    # 112x112 -> smart_resize keeps 112x112 -> (112/28)^2 = 16 tokens per image.
    assert "samples: 6 valid, 0 with problems" in text and "min 16, max 16" in text and "[16, 32): 6" in text
    # With max_pixels 3136, 112x112 resizes to 56x56: 4 tokens.
    assert (
        run_cli(
            "data", "check", "--data-files", f"{out}/train.jsonl", "--image-folders", folder, "--max-pixels", "3136"
        )
        == 0
    )
    assert "min 4, max 4" in capsys.readouterr().out


def test_check_reports_exactly_the_corrupted_lines(tmp_path, capsys):
    out = str(tmp_path / "syn")
    good = synthetic.generate(out, 10, seed=2)
    lines = Path(good).read_bytes().splitlines()
    lines[2] = b'{"id": "broken", "conversations": ['  # line 3
    lines[4] = lines[4].replace(b"train/train_000004.png", b"train/gone.png")  # line 5
    lines[6] = lines[6].replace(b"train/train_000006.png", b"../../secret.png")  # line 7
    lines[8] = lines[8].replace(b"describes", b"describ\xe9s")  # line 9
    bad = write_jsonl(tmp_path / "bad.jsonl", lines)
    folder = synthetic.image_folder(out)
    assert run_cli("data", "check", "--data-files", bad, "--image-folders", folder) == 1
    text = capsys.readouterr().out
    found = {(m[1], int(m[2]), m[3], m[4]) for m in map(PROBLEM_LINE.match, text.splitlines()) if m}
    assert found == {
        (bad, 3, "<line>", "invalid_json"),
        (bad, 5, "image", "missing_image"),
        (bad, 7, "image", "unsafe_path"),
        (bad, 9, "<line>", "non_utf8"),
    }
    assert "samples: 6 valid, 4 with problems" in text

    samples, report = load_jsonl_datasets(bad, folder, on_error="skip")
    assert report.counts_by_kind() == {"invalid_json": 1, "missing_image": 1, "non_utf8": 1, "unsafe_path": 1}
    assert [s.line for s in samples] == [1, 2, 4, 6, 8, 10]
    with pytest.raises(DataError, match=r":3: field '<line>'"):
        load_jsonl_datasets(bad, folder)

    # An image that exists but cannot be decoded is found at load time, so `check` reports it with its line.
    with open(os.path.join(folder, "train", "train_000001.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n broken")
    assert run_cli("data", "check", "--data-files", good, "--image-folders", folder) == 1
    found = [m.groups() for m in map(PROBLEM_LINE.match, capsys.readouterr().out.splitlines()) if m]
    assert found == [(good, "2", "image", "unreadable_image")]


def test_check_reports_argument_errors_without_a_traceback(tmp_path, capsys):
    assert run_cli("data", "check", "--data-files", "a.jsonl:b.jsonl", "--image-folders", "x") == 1
    assert "image_folders" in capsys.readouterr().out
    assert run_cli("data", "check", "--data-files", str(tmp_path / "nope.jsonl"), "--image-folders", "x") == 1
    assert "nope.jsonl" in capsys.readouterr().out
