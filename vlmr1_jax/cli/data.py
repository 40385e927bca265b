"""`vlmr1 data synth` (write built-in synthetic REC, GUI or OVD data) and `vlmr1 data check` (validate jsonl +
images)."""

from __future__ import annotations

import argparse
import collections

from vlmr1_jax.config import DataConfig, ModelConfig
from vlmr1_jax.data import synthetic, synthetic_gui, synthetic_ovd
from vlmr1_jax.data.jsonl import DataError, LoadReport, Sample, duplicate_ids, load_jsonl_datasets, read_image_sizes
from vlmr1_jax.models.family import family_names, get_family
from vlmr1_jax.models.processor import Processor, max_pixels_or_default
from vlmr1_jax.processing.image import MAX_IMAGE_PIXELS, image_grid


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `data synth` and `data check` to the `vlmr1` command line."""
    data = subparsers.add_parser("data", help="make or check VLM-R1 jsonl datasets")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    synth = actions.add_parser("synth", help="write synthetic REC, GUI or OVD data (jsonl + images)")
    synth.add_argument(
        "--task",
        choices=("rec", "gui", "ovd"),
        default="rec",
        help="rec: referring expressions (recipes rec_3b, demo_tiny); gui: before/after screenshots with a defect "
        "(gui_3b); ovd: several labelled boxes per image (ovd_3b)",
    )
    synth.add_argument("--out", required=True, help="output folder (<out>/<split>.jsonl, <out>/images/)")
    synth.add_argument("--n", type=int, required=True, help="number of samples")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--split",
        choices=synthetic.SPLITS,
        default="train",
        help="train/val are in-domain; ood (--task rec only) targets colour+shape pairs never seen in train",
    )
    synth.add_argument(
        "--families",
        nargs="+",
        choices=synthetic.FAMILIES,
        default=None,
        help="--task rec: referring-expression families to draw from (default: simple)",
    )
    synth.add_argument("--image-size", type=int, default=112, help="side of the square images in pixels")
    synth.set_defaults(func=run_synth)

    check = actions.add_parser(
        "check", help="validate every line and image, flag duplicate ids and empty files; exit 1 on any problem"
    )
    check.add_argument("--data-files", required=True, help="':'-separated jsonl files")
    check.add_argument("--image-folders", required=True, help="':'-separated image folders, one per file")
    check.add_argument("--reward-method", default=None, help="':'-separated accuracy-reward methods, one per file")
    check.add_argument("--min-pixels", type=int, default=DataConfig.min_pixels)
    check.add_argument("--max-pixels", type=int, help="default: the family's (data.max_pixels)")
    check.add_argument(
        "--family",
        default=ModelConfig.family,
        choices=family_names(),
        help="model family whose processor counts tokens",
    )
    check.add_argument(
        "--max-image-pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        help="cap on an original image's pixels (data.max_image_pixels)",
    )
    check.set_defaults(func=run_check)


def run_synth(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    if args.task == "rec":
        families = tuple(args.families or ["simple"])
        path = synthetic.generate(args.out, args.n, args.seed, args.split, families, args.image_size)
    elif args.families is not None:
        raise ValueError(f"--families applies to --task rec only, not --task {args.task}; drop it")
    else:
        generate = synthetic_gui.generate if args.task == "gui" else synthetic_ovd.generate
        path = generate(args.out, args.n, args.seed, args.split, args.image_size)
    print(
        f"wrote {args.n} {args.task} {args.split} samples to {path} (images under {synthetic.image_folder(args.out)})"
    )
    return 0


def token_histogram(counts: collections.Counter) -> list[str]:
    """Power-of-two bins of image-token counts, one line per non-empty bin."""
    bins: collections.Counter = collections.Counter()
    for tokens, n in counts.items():
        bins[1 << (tokens.bit_length() - 1)] += n
    width = max(bins.values(), default=0)
    return [f"  [{lo}, {2 * lo}): {n} {'#' * max(1, round(40 * n / width))}" for lo, n in sorted(bins.items())]


def image_tokens(sample: Sample, processor: Processor, min_pixels: int, max_pixels: int) -> list[int]:
    """Prompt tokens per image of `sample` after the family processor's resize."""
    tokens = []
    for i, (height, width) in enumerate(read_image_sizes(sample)):
        try:
            grid = image_grid(processor, height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        except ValueError as e:
            raise DataError("bad_image_size", sample.source, sample.line, f"image[{i}]", str(e)) from None
        tokens.append(processor.image_tokens(grid))
    return tokens


def check_images(
    samples: list[Sample], report: LoadReport, processor: Processor, min_pixels: int, max_pixels: int
) -> tuple[int, collections.Counter]:
    """Decode every image; problems go to `report`. Returns (valid samples, Counter of tokens per image)."""
    valid, counts = 0, collections.Counter[int]()
    for sample in samples:
        try:
            counts.update(image_tokens(sample, processor, min_pixels, max_pixels))
        except DataError as e:
            report.add(e)
            continue
        valid += 1
    return valid, counts


def run_check(args: argparse.Namespace) -> int:
    try:
        samples, report = load_jsonl_datasets(
            args.data_files,
            args.image_folders,
            args.reward_method,
            on_error="skip",
            max_image_pixels=args.max_image_pixels,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}")
        return 1
    duplicates = duplicate_ids(samples)
    for problem in duplicates:
        report.add(problem)
    repeated = {(p.file, p.line) for p in duplicates}
    unique = [s for s in samples if (s.source, s.line) not in repeated]
    processor = get_family(args.family).processor
    max_pixels = max_pixels_or_default(args.max_pixels, processor)
    valid, counts = check_images(unique, report, processor, args.min_pixels, max_pixels)
    print(
        f"files: {len(report.files)}  lines: {report.lines}  samples: {valid} valid, "
        f"{report.lines - valid} with problems"
    )
    print(f"images: {sum(counts.values())} in valid samples")
    if counts:
        print(
            f"tokens per image (min_pixels={args.min_pixels}, max_pixels={max_pixels}): "
            f"min {min(counts)}, max {max(counts)}"
        )
        print("\n".join(token_histogram(counts)))
    if report.problems:
        print("\n".join(["problems:", *report.problem_lines(max_listed=None)]))
        return 1
    print("no problems found")
    return 0
