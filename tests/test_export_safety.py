"""`--overwrite` replaces only a folder vlmr1 wrote (it carries the release marker): never a user's folder, a run
folder, or the current directory; what was there stays byte for byte."""

from __future__ import annotations

import os

import pytest

from converters.release import RELEASE_MARKER, export_release
from tests.helpers.hf_models import tiny_model_with_qwen_ids


@pytest.fixture(scope="module")
def model():
    return tiny_model_with_qwen_ids()


def test_overwrite_replaces_a_release_we_wrote(model, tmp_path):
    out = export_release(model, model.cfg, tmp_path / "rel", dtype="fp32")
    assert (out / RELEASE_MARKER).is_file()
    (out / "stale.txt").write_text("old")
    export_release(model, model.cfg, out, dtype="fp32", overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()


@pytest.mark.parametrize("what", ["user folder", "run folder"])
def test_overwrite_refuses_folders_without_the_marker(model, tmp_path, what):
    out = tmp_path / "target"
    (out / "checkpoints" / "100").mkdir(parents=True) if what == "run folder" else out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=f"no {RELEASE_MARKER} marker"):
        export_release(model, model.cfg, out, dtype="fp32", overwrite=True)
    assert (out / "notes.txt").read_text() == "precious"
    assert not any(p.name.startswith(".target.tmp") for p in tmp_path.iterdir())  # nothing left behind


def test_overwrite_refuses_the_current_directory_and_its_parents(model, tmp_path, monkeypatch):
    inside = tmp_path / "work" / "here"
    inside.mkdir(parents=True)
    (inside / RELEASE_MARKER).write_text("")  # even a marked folder
    monkeypatch.chdir(inside)
    for out in (".", ".."):
        with pytest.raises(FileExistsError, match="current directory or one of its parents"):
            export_release(model, model.cfg, out, dtype="fp32", overwrite=True)
    assert os.listdir(inside) == [RELEASE_MARKER]


def test_without_overwrite_a_non_empty_folder_is_refused(model, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a").write_text("a")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        export_release(model, model.cfg, tmp_path / "x", dtype="fp32")
