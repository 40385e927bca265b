"""Hostile data (tests/data/hostile) is caught at load time, located by file, line and field, and `data check`
flags all of it; refused images are exactly the ones the training-time image path cannot take."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from tests.helpers.cli import PROBLEM_LINE, run_cli
from vlmr1_jax.config import load_config
from vlmr1_jax.data.jsonl import DataError, load_jsonl_datasets
from vlmr1_jax.models.family import get_family
from vlmr1_jax.models.qwen2_5_vl.image import MAX_PIXELS, MIN_PIXELS, preprocess_image
from vlmr1_jax.processing.image import image_grid, load_image, upscaled_size

SHIPPED = Path(__file__).parent / "data" / "hostile"
GOOD_LINES = [1, 7, 16, 17]
EXPECTED = {  # line of hostile.jsonl -> (kind, field); README.md there describes each case
    2: ("unreadable_image", "image"),
    3: ("unreadable_image", "image"),
    4: ("unreadable_image", "image"),
    5: ("image_too_large", "image"),
    6: ("bad_image_size", "image"),
    8: ("image_too_large", "image"),
    9: ("wrong_type", "conversations[1].value"),
    10: ("wrong_type", "conversations[1].value"),
    11: ("wrong_type", "conversations[1].value"),
    12: ("missing_key", "conversations[1].value"),
    13: ("non_utf8", "<line>"),
    14: ("wrong_type", "<line>"),
    15: ("unsafe_path", "image"),
    18: ("unreadable_image", "image[1]"),
}
BOMB_SIZE = (14000, 14000)  # 196 MP: over twice PIL's Image.MAX_IMAGE_PIXELS, so PIL itself refuses it
BIG_SIZE = (8000, 7500)  # 60 MP: under PIL's limits, over our 50 MP cap


def processed_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) an original image reaches Qwen2.5-VL at, as the data check predicts it without decoding."""
    grid = image_grid(get_family("qwen2_5_vl").processor, height, width, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return grid[1] * 14, grid[2] * 14


def write_blank_png(path: Path, width: int, height: int) -> None:
    """A valid all-black 1-bit PNG, streamed row by row: KBs on disk and in memory whatever its size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """The shipped folder plus what it cannot ship: the bomb, the 60 MP image and the escaping symlink."""
    root = tmp_path_factory.mktemp("hostile") / "hostile"
    shutil.copytree(SHIPPED, root)
    write_blank_png(root / "images" / "bomb.png", *BOMB_SIZE)
    write_blank_png(root / "images" / "big.png", *BIG_SIZE)
    os.symlink(os.path.join("..", "outside", "secret.png"), root / "images" / "escape.png")
    return root


def hostile_lines(root: Path) -> list[bytes]:
    return (root / "hostile.jsonl").read_bytes().splitlines()


def test_fixture_images_are_what_they_claim(hostile):
    """The cases are real: the bomb trips PIL's own check, the big image opens but is over our cap, the
    truncated files open (their headers are whole) and fail only when their data is read."""
    with pytest.raises(Image.DecompressionBombError):
        Image.open(hostile / "images" / "bomb.png")
    with Image.open(hostile / "images" / "big.png") as image:
        assert image.size == BIG_SIZE and 50_000_000 < BIG_SIZE[0] * BIG_SIZE[1] < Image.MAX_IMAGE_PIXELS
    for name in ("truncated.png", "truncated.jpg"):
        with Image.open(hostile / "images" / name) as image, pytest.raises(OSError, match=r"[Tt]runcated"):
            image.load()
    assert os.path.realpath(hostile / "images" / "escape.png") == str((hostile / "outside" / "secret.png").resolve())
    assert (hostile / "images" / "bomb.png").stat().st_size < 100_000
    assert sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file()) < 20_000


@pytest.mark.parametrize("line", sorted(EXPECTED))
def test_raise_names_file_line_and_field(hostile, tmp_path, line):
    lines = hostile_lines(hostile)
    path = tmp_path / "one.jsonl"
    path.write_bytes(lines[0] + b"\n" + lines[line - 1] + b"\n")
    with pytest.raises(DataError) as info:
        load_jsonl_datasets(str(path), str(hostile / "images"))
    err, (kind, field) = info.value, EXPECTED[line]
    assert (err.kind, err.file, err.line, err.field) == (kind, str(path), 2, field)
    assert str(err).startswith(f"{path}:2: field '{field}': ")
    if field.startswith("image"):  # image problems also name the image file
        assert str(hostile / "images") in err.detail


def test_skip_loads_the_good_lines_and_reports_every_other(hostile):
    data, empty = hostile / "hostile.jsonl", hostile / "empty.jsonl"
    samples, report = load_jsonl_datasets(
        f"{data}:{empty}", f"{hostile / 'images'}:{hostile / 'images'}", on_error="skip"
    )
    assert [s.line for s in samples] == GOOD_LINES
    assert [s.id for s in samples] == ["good-png", "one-pixel", "good-png", "good-jpeg"]
    found = {(p.file, p.line, p.kind, p.field) for p in report.problems}
    assert found == {(str(data), line, kind, field) for line, (kind, field) in EXPECTED.items()} | {
        (str(empty), 0, "empty_file", "<file>")
    }
    assert (report.lines, report.loaded, len(report.problems)) == (18, 4, len(EXPECTED) + 1)
    assert "no samples" in report.summary()


def test_empty_file_raises(hostile, tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    for path in (hostile / "empty.jsonl", blank):
        with pytest.raises(DataError, match=rf"^{path}:0: field '<file>': no samples") as info:
            load_jsonl_datasets(str(path), str(hostile / "images"))
        assert info.value.kind == "empty_file"


def test_pixel_cap_is_the_configured_one(hostile, tmp_path):
    """The 60 MP image is refused by data.max_image_pixels (the default, and what training passes); raising
    the cap admits it (its header is read, its 60 MP are never decoded)."""
    path = tmp_path / "big.jsonl"
    path.write_bytes(hostile_lines(hostile)[7] + b"\n")
    with pytest.raises(
        DataError,
        match=r"8000x7500 = 60000000 pixels is over the cap of 50000000 "
        r"\(data\.max_image_pixels\)",
    ):
        load_jsonl_datasets(str(path), str(hostile / "images"))
    samples, _ = load_jsonl_datasets(str(path), str(hostile / "images"), max_image_pixels=60_000_000)
    assert [s.id for s in samples] == ["over-pixel-cap"]

    from vlmr1_jax.train.setup import load_samples

    overrides = [f"data.data_file_paths={path}", f"data.image_folders={hostile / 'images'}"]
    with pytest.raises(DataError, match="max_image_pixels"):
        load_samples(load_config(None, overrides))
    assert len(load_samples(load_config(None, [*overrides, "data.max_image_pixels=60000000"]))) == 1
    with pytest.raises(ValueError, match=r"data\.max_image_pixels"):
        load_config(None, ["data.max_image_pixels=0"])


@pytest.mark.parametrize("name", ["garbage.png", "truncated.png", "truncated.jpg", "bomb.png", "wide.png"])
def test_refused_images_fail_the_training_image_path(hostile, name):
    """What the loader refuses (other than by policy: the pixel cap, the symlink) would fail when the batch is
    built: the real load_image + preprocess_image path."""
    with pytest.raises(Exception):  # noqa: B017 -- PIL and the processor fail in different ways
        preprocess_image(load_image(hostile / "images" / name))


@pytest.mark.parametrize("name, size", [("good.png", (32, 24)), ("good.jpg", (32, 24)), ("pixel.png", (1, 1))])
def test_accepted_images_pass_the_training_image_path(hostile, name, size):
    """A 1x1 image is upscaled to 28x28 (VLM-R1) and smart_resize then meets min_pixels; the size the loader
    predicts (processed_size) is the one the real path produces and the one HF's smart_resize gives."""
    with Image.open(hostile / "images" / name) as image:
        assert image.size == size
    pixel_values, grid = preprocess_image(load_image(hostile / "images" / name))
    width, height = upscaled_size(*size)
    assert processed_size(size[1], size[0]) == (grid[1] * 14, grid[2] * 14) == hf_smart_resize(height, width)
    assert pixel_values.shape[0] == grid[1] * grid[2]


def test_jpeg_with_bytes_after_its_end_marker_is_accepted(hostile, tmp_path):
    """Not ending in EOI is not proof of truncation (cameras append data): such a JPEG is decoded to decide."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "tail.jpg").write_bytes((hostile / "images" / "good.jpg").read_bytes() + b"\x00appended")
    path = tmp_path / "tail.jsonl"
    path.write_text('{"image": "tail.jpg", "conversations": [{"value": "<image>q"}, {"value": "a"}]}\n')
    samples, _ = load_jsonl_datasets(str(path), str(folder))
    assert samples[0].image_paths == (str(folder / "tail.jpg"),)
    assert preprocess_image(load_image(folder / "tail.jpg"))[1] == (1, 4, 6)  # 32x24 -> 84x56


def test_aspect_ratio_is_refused_exactly_where_hf_refuses(hostile):
    """201x1 upscales to 5628x28 (ratio 201): HF's smart_resize refuses it; 200x1 (ratio 200) it accepts."""
    for width, ok in ((200, True), (201, False)):
        up_width, up_height = upscaled_size(width, 1)
        if ok:
            assert processed_size(1, width) == hf_smart_resize(up_height, up_width)
        else:
            with pytest.raises(ValueError, match="aspect ratio"):
                hf_smart_resize(up_height, up_width)
            with pytest.raises(ValueError, match="aspect ratio"):
                processed_size(1, width)


def check_output(capsys, files: list[Path], folder: Path) -> tuple[int, str, set[tuple[str, int, str, str]]]:
    """`vlmr1 data check` on `files`: (exit code, output, {(file, line, field, kind)} of its problem lines)."""
    code = run_cli(
        "data",
        "check",
        "--data-files",
        ":".join(map(str, files)),
        "--image-folders",
        ":".join([str(folder)] * len(files)),
    )
    text = capsys.readouterr().out
    found = {(m[1], int(m[2]), m[3], m[4]) for m in map(PROBLEM_LINE.match, text.splitlines()) if m}
    return code, text, found


def test_check_flags_every_hostile_case(hostile, capsys):
    data, empty = hostile / "hostile.jsonl", hostile / "empty.jsonl"
    code, text, found = check_output(capsys, [data, empty], hostile / "images")
    assert code == 1
    assert found == {(str(data), line, field, kind) for line, (kind, field) in EXPECTED.items()} | {
        (str(data), 16, "id", "duplicate_id"),
        (str(empty), 0, "<file>", "empty_file"),
    }
    assert f"{data}:16: field 'id': id \"good-png\" is also used on line 1 [duplicate_id]" in text
    assert "pixels is over the cap of 50000000" in text and "no samples" in text
    assert "files: 2  lines: 18  samples: 3 valid, 15 with problems" in text
    assert "no problems found" not in text


@pytest.mark.parametrize(
    "lines, kind",
    [
        ([], "empty_file"),
        ([9], "wrong_type"),
        ([9, 10, 11], "wrong_type"),
        ([1, 16], "duplicate_id"),
        ([8], "image_too_large"),
    ],
)
def test_check_exits_1_for_each_case_alone(hostile, tmp_path, capsys, lines, kind):
    source = hostile_lines(hostile)
    path = tmp_path / "case.jsonl"
    path.write_bytes(b"".join(source[line - 1] + b"\n" for line in lines))
    code, text, found = check_output(capsys, [path], hostile / "images")
    assert code == 1 and "no problems found" not in text
    assert {p[3] for p in found} == {kind}
