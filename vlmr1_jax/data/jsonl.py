"""VLM-R1 jsonl datasets: parse and normalise each line into a `Sample`, reporting bad input by file, line and field.

Format and normalisation follow VLM-R1 `grpo_jsonl.py`. Images are opened and size-checked here, at load time
(`check_image_file`: header, pixel cap, aspect ratio, truncation), so a bad image is reported with its line instead
of failing a training step; pixels are decoded later, when a batch is built. `read_image_sizes` decodes them fully
(`vlmr1 data check`).
"""

from __future__ import annotations

import collections
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from vlmr1_jax.processing.image import MAX_IMAGE_PIXELS, check_image_size

DEFAULT_REWARD_METHOD = "default"
# The keys the loader consumes; every other key of a line is passed through in `Sample.extra` (and on to rewards).
CONSUMED_KEYS = ("id", "image", "conversations", "accu_reward_method")
# Reward arguments derived from a line rather than read from it (the completions; the loader's problem, solution
# and image paths; the trainer's prompt conversation and image grids): a jsonl key with one of these names would be
# shadowed, so it is refused (`reserved_key`) instead of silently replaced.
RESERVED_KEYS = ("completions", "prompts", "problem", "solution", "image_path", "image_grid_thw", "model_image_size")


class DataError(ValueError):
    """One bad sample (or line), located by file, 1-based line number (0: the file as a whole) and field; `kind`
    names the problem class."""

    def __init__(self, kind: str, file: str, line: int, field: str, detail: str):
        self.kind = kind
        self.file = file
        self.line = line
        self.field = field
        self.detail = detail
        super().__init__(f"{file}:{line}: field '{field}': {detail} [{kind}]")


@dataclass(frozen=True)
class Sample:
    """One normalised prompt: VLM-R1's `problem` / `solution` columns, image paths joined to their folder, origin,
    and in `extra` every other key of its line (VLM-R1's dataset keeps them as columns; rewards receive them)."""

    id: Any
    problem: str
    solution: str
    image_paths: tuple[str, ...]
    accu_reward_method: str
    source: str
    line: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadReport:
    """What a load (or a check) read and every problem it found; nothing is dropped without being listed here."""

    files: list[str] = field(default_factory=list)
    lines: int = 0
    loaded: int = 0
    problems: list[DataError] = field(default_factory=list)

    def add(self, error: DataError) -> None:
        self.problems.append(error)

    def counts_by_kind(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(p.kind for p in self.problems).items()))

    def problem_lines(self, max_listed: int | None = 20) -> list[str]:
        """Each kind with its count, then up to `max_listed` (None: all) of its problems as `file:line: ...`."""
        out = []
        for kind, count in self.counts_by_kind().items():
            listed = [p for p in self.problems if p.kind == kind][:max_listed]
            out += [f"  {kind}: {count}", *(f"    {p}" for p in listed)]
            if len(listed) < count:
                out.append(f"    ... and {count - len(listed)} more")
        return out

    def summary(self, max_listed: int | None = 20) -> str:
        """One line of totals followed by `problem_lines`."""
        head = (
            f"{self.loaded} samples loaded from {self.lines} lines in {len(self.files)} file(s); "
            f"{len(self.problems)} problem(s)"
        )
        return "\n".join([head, *self.problem_lines(max_listed)])


def split_colon_list(value: str | Sequence[str], name: str) -> list[str]:
    """VLM-R1's ':'-separated argument lists; a sequence is taken as already split."""
    items = value.split(":") if isinstance(value, str) else list(value)
    if not items or any(not isinstance(v, str) for v in items):
        raise ValueError(f"{name} must be a ':'-separated string or a list of strings, got {value!r}")
    return items


def safe_image_path(folder: str, rel: Any, *, file: str, line: int, field: str) -> str:
    """Join `rel` under `folder`, refusing non-strings, absolute paths and `..` escapes (checked after normpath).

    This check is lexical; `check_image_file` then refuses symlinks that resolve outside the folder.
    """
    if not isinstance(rel, str) or not rel:
        raise DataError("wrong_type", file, line, field, f"expected a non-empty string path, got {rel!r}")
    if "\x00" in rel:
        raise DataError("unsafe_path", file, line, field, "path contains a NUL byte")
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise DataError("unsafe_path", file, line, field, f"path {rel!r} escapes the image folder {folder!r}")
    return os.path.join(folder, norm)


def _describe(value: Any, limit: int = 40) -> str:
    """A parsed JSON value's type and (clipped) text, for error messages: 'null', 'number 3', 'array [1, 2]'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        kind = "boolean"
    elif isinstance(value, (int, float)):
        kind = "number"
    else:
        kinds: dict[type, str] = {str: "string", list: "array", dict: "object"}
        kind = kinds.get(type(value), type(value).__name__)
    text = json.dumps(value)
    return f"{kind} {text if len(text) <= limit else text[:limit] + '...'}"


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _check_complete(image: Image.Image, path: str) -> None:
    """Raise if the image data is cut short, reading as little as that takes: PNG chunk CRCs (`verify`, no
    decode); a JPEG ending in its EOI marker, else a 1/8-scale decode; any other format a full decode."""
    if image.format == "PNG":
        image.verify()
    elif image.format == "JPEG":
        with open(path, "rb") as f:
            f.seek(-2, os.SEEK_END)
            if f.read(2) == b"\xff\xd9":
                return
        image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
    else:
        image.load()


def check_image_file(
    path: str, folder: str, max_image_pixels: int = MAX_IMAGE_PIXELS, *, file: str, line: int, field: str
) -> None:
    """Refuse, as a `DataError`, an image that would fail or blow up when its batch is built: missing, a symlink
    out of `folder`, undecodable or truncated, over `max_image_pixels` (from its header, before any decode) or
    refused by the processor (aspect ratio over 200). Tiny images pass: VLM-R1 upscales them."""

    def problem(kind: str, detail: str) -> DataError:
        return DataError(kind, file, line, field, f"{path}: {detail}")

    if not os.path.isfile(path):
        raise problem(
            "missing_image",
            "image file not found"
            if not os.path.lexists(path)
            else "not a regular file (a broken symlink, a folder or a device)",
        )
    real, real_folder = os.path.realpath(path), os.path.realpath(folder)
    if not _inside(real, real_folder):
        raise problem(
            "unsafe_path",
            f"resolves to {real}, outside the image folder {real_folder}; copy the file "
            "into the folder or point image_folders at the folder that holds it",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our cap is the stricter one
            image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise problem("image_too_large", f"PIL refuses it as a decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001 -- PIL signals a bad file with many exception types
        raise problem("unreadable_image", f"cannot open ({type(e).__name__}: {e})") from None
    with image:
        width, height = image.size
        if width * height > max_image_pixels:
            raise problem(
                "image_too_large",
                f"{width}x{height} = {width * height} pixels is over the cap of "
                f"{max_image_pixels} (data.max_image_pixels); downscale the file or raise the cap",
            )
        try:
            check_image_size(height, width)
        except ValueError as e:
            raise problem(
                "bad_image_size", f"{width}x{height} (width x height) cannot be processed: {e}; crop or pad the image"
            ) from None
        try:
            _check_complete(image, path)
        except Exception as e:  # noqa: BLE001 -- as above, for a truncated or corrupt file
            raise problem("unreadable_image", f"truncated or corrupt ({type(e).__name__}: {e})") from None


def _field_value(item: dict, index: int, file: str, line: int) -> Any:
    convs = item["conversations"]
    turn = convs[index]
    if not isinstance(turn, dict):
        raise DataError(
            "wrong_type", file, line, f"conversations[{index}]", f"expected an object, got {type(turn).__name__}"
        )
    if "value" not in turn:
        raise DataError("missing_key", file, line, f"conversations[{index}].value", "key is missing")
    return turn["value"]


def _image_list(item: dict, file: str, line: int) -> list[tuple[str, Any]]:
    """(field name, relative path) for each image of a line; [] for a text-only sample."""
    if "image" not in item:
        return []
    image = item["image"]
    if isinstance(image, str):
        return [("image", image)]
    if isinstance(image, list):
        return [(f"image[{i}]", p) for i, p in enumerate(image)]
    raise DataError(
        "wrong_type", file, line, "image", f"expected a string or a list of strings, got {type(image).__name__}"
    )


def parse_sample(
    text: str,
    *,
    file: str,
    line: int,
    image_folder: str,
    reward_method: str,
    check_images: bool = True,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> Sample:
    """Parse one jsonl line the way VLM-R1 does (and `check_image_file` its images when `check_images`); raise
    `DataError` on the first problem found."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError("invalid_json", file, line, "<line>", f"{e.msg} at column {e.colno}") from None
    except RecursionError:
        raise DataError("invalid_json", file, line, "<line>", "JSON nested too deeply") from None
    if not isinstance(item, dict):
        raise DataError("wrong_type", file, line, "<line>", f"expected a JSON object, got {type(item).__name__}")
    if "conversations" not in item:
        raise DataError("missing_key", file, line, "conversations", "key is missing")
    convs = item["conversations"]
    if not isinstance(convs, list):
        raise DataError("wrong_type", file, line, "conversations", f"expected a list, got {type(convs).__name__}")
    if len(convs) < 2:
        raise DataError("missing_key", file, line, f"conversations[{len(convs)}]", "need a human turn and a gpt turn")
    question = _field_value(item, 0, file, line)
    if not isinstance(question, str):
        raise DataError(
            "wrong_type", file, line, "conversations[0].value", f"expected a string, got {type(question).__name__}"
        )
    answer = _field_value(item, 1, file, line)
    if not isinstance(answer, str):  # VLM-R1's rewards read the solution as text
        raise DataError(
            "wrong_type",
            file,
            line,
            "conversations[1].value",
            f"expected the solution as a string, got {_describe(answer)}; write it as a JSON string",
        )
    answer = answer.replace("<answer>", "").replace("</answer>", "").strip()
    reserved = [key for key in RESERVED_KEYS if key in item]
    if reserved:
        raise DataError(
            "reserved_key",
            file,
            line,
            reserved[0],
            f"rewards get '{reserved[0]}' derived by the loader or trainer, which would hide this field; rename "
            f"the key (reserved: {', '.join(RESERVED_KEYS)})",
        )
    method = item.get("accu_reward_method", reward_method)
    if not isinstance(method, str):
        raise DataError(
            "wrong_type", file, line, "accu_reward_method", f"expected a string, got {type(method).__name__}"
        )
    paths = []
    for name, rel in _image_list(item, file, line):
        path = safe_image_path(image_folder, rel, file=file, line=line, field=name)
        if check_images:
            check_image_file(path, image_folder, max_image_pixels, file=file, line=line, field=name)
        paths.append(path)
    return Sample(
        id=item.get("id"),
        problem=question.replace("<image>", ""),
        solution=f"<answer> {answer} </answer>",
        image_paths=tuple(paths),
        accu_reward_method=method,
        source=file,
        line=line,
        extra={k: v for k, v in item.items() if k not in CONSUMED_KEYS},
    )


def _decoded_lines(path: str) -> Iterator[tuple[int, str | DataError]]:
    """(1-based line number, text or a non-UTF-8 `DataError`) for every non-blank line of `path`."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield (
                    number,
                    DataError(
                        "non_utf8",
                        path,
                        number,
                        "<line>",
                        f"invalid UTF-8 byte {raw[e.start : e.start + 1]!r} at byte {e.start}",
                    ),
                )


def load_jsonl_datasets(
    data_file_paths: str | Sequence[str],
    image_folders: str | Sequence[str],
    reward_methods: str | Sequence[str] | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    check_images: bool = True,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[list[Sample], LoadReport]:
    """Load and concatenate VLM-R1 jsonl files (':'-separated like `--data_file_paths`), in file then line order.

    `on_error="raise"` raises the first `DataError`; `"skip"` leaves the bad sample out and records it in the report.
    A file without a non-blank line is a problem too (`empty_file`, line 0). `check_images` runs
    `check_image_file` on every image (opened, not decoded: about 0.1 ms per small PNG).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    files = split_colon_list(data_file_paths, "data_file_paths")
    folders = split_colon_list(image_folders, "image_folders")
    if len(files) != len(folders):
        raise ValueError(
            f"data_file_paths has {len(files)} entries but image_folders has {len(folders)}; they must match one to one"
        )
    methods = (
        [DEFAULT_REWARD_METHOD] * len(files)
        if reward_methods is None
        else split_colon_list(reward_methods, "reward_method")
    )
    if len(methods) != len(files):
        raise ValueError(
            f"reward_method has {len(methods)} entries but data_file_paths has {len(files)}; they must match one to one"
        )
    report = LoadReport(files=list(files))
    samples = []
    for file, folder, method in zip(files, folders, methods):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"data file not found: {file}")
        lines_before = report.lines
        for number, text in _decoded_lines(file):
            report.lines += 1
            try:
                if isinstance(text, DataError):
                    raise text
                samples.append(
                    parse_sample(
                        text,
                        file=file,
                        line=number,
                        image_folder=folder,
                        reward_method=method,
                        check_images=check_images,
                        max_image_pixels=max_image_pixels,
                    )
                )
            except DataError as e:
                if on_error == "raise":
                    raise
                report.add(e)
        if report.lines == lines_before:
            empty = DataError("empty_file", file, 0, "<file>", "no samples: the file is empty or only has blank lines")
            if on_error == "raise":
                raise empty
            report.add(empty)
    report.loaded = len(samples)
    return samples, report


def duplicate_ids(samples: Sequence[Sample]) -> list[DataError]:
    """A `duplicate_id` problem for each sample whose id an earlier sample of the same file already has (samples
    without an id are never duplicates; files are separate datasets with their own ids)."""
    first: dict[tuple[str, str], int] = {}
    problems = []
    for sample in samples:
        if sample.id is None:
            continue
        key = (sample.source, json.dumps(sample.id, sort_keys=True))
        if key in first:
            problems.append(
                DataError(
                    "duplicate_id", sample.source, sample.line, "id", f"id {key[1]} is also used on line {first[key]}"
                )
            )
        else:
            first[key] = sample.line
    return problems


def read_image_sizes(sample: Sample) -> list[tuple[int, int]]:
    """Fully decode every image of `sample` and return their (height, width); `DataError` if one cannot be read."""
    sizes = []
    for i, path in enumerate(sample.image_paths):
        name = "image" if len(sample.image_paths) == 1 else f"image[{i}]"
        try:
            with Image.open(path) as im:
                im.load()
                width, height = im.size
        except Exception as e:  # noqa: BLE001 -- PIL signals a bad file with many exception types
            raise DataError(
                "unreadable_image", sample.source, sample.line, name, f"cannot decode {path}: {type(e).__name__}: {e}"
            ) from None
        sizes.append((height, width))
    return sizes
