"""Built-in synthetic REC data: coloured shapes on noisy dark backgrounds, referring expressions, tight pixel boxes.

The shapes, their placement and the atomic split writer are shared with the GUI and OVD sets (synthetic_gui,
synthetic_ovd). The `simple` family ("the red circle") is the task measured as learnable on 2 CPU cores. `superlative`
("the largest red shape") and `relational` ("the triangle left of the green star") are built so that exactly one
object matches. Train / val never contain the `HELD_OUT` colour+shape pairs; in `ood` the target is always one.
Output is VLM-R1 jsonl plus an image folder; every sample is a pure function of (seed, split, index).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle", "star")
# A Latin square: every colour and every shape still appears in training, only these pairings do not.
HELD_OUT = frozenset({("red", "star"), ("green", "triangle"), ("blue", "square"), ("yellow", "circle")})
ALL_PAIRS = tuple(itertools.product(COLOURS, SHAPES))
TRAIN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)
FAMILIES = ("simple", "superlative", "relational")
SPLITS = ("train", "val", "ood")
PROMPT_PREFIX = "Please provide the bounding box coordinates of the region this sentence describes: "
IMAGE_DIR = "images"
MIN_SIZE, MAX_SIZE = 16, 48
BACKGROUND_MAX = 60
NOISE_SIGMA = 8.0
GAP = 2  # free pixels between footprints, so boxes never touch
SUPERLATIVES = ("largest", "smallest", "leftmost", "rightmost")
AREA_RATIO = 1.5  # a size superlative's winner has 1.5x the area of every rival and no smaller extent
POSITION_MARGIN = 8  # a position superlative's winner is 8 px further left / right (box centres) than every rival
# relation -> (holds(target_box, anchor_box), opposite relation)
RELATIONS = {
    "left of": (lambda t, a: t[2] <= a[0], "right of"),
    "right of": (lambda t, a: t[0] >= a[2], "left of"),
    "above": (lambda t, a: t[3] <= a[1], "below"),
    "below": (lambda t, a: t[1] >= a[3], "above"),
}


@dataclass(frozen=True)
class Shape:
    """One drawn object: its s x s footprint at (x0, y0), tight box [x1, y1, x2, y2) (x2/y2 exclusive), pixel area."""

    colour: str
    shape: str
    size: int
    x0: int
    y0: int
    box: tuple[int, int, int, int]
    area: int

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def extent(self) -> int:
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1])


def shape_mask(shape: str, size: int, x0: int, y0: int, image_size: int) -> Image.Image:
    """A binary ('L') mask of one shape inside its footprint; the same pixels are painted and boxed."""
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1 = x0 + size - 1, y0 + size - 1
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "triangle":
        draw.polygon([(x0 + (size - 1) / 2, y0), (x0, y1), (x1, y1)], fill=255)
    elif shape == "star":
        cx, cy, r = x0 + (size - 1) / 2, y0 + (size - 1) / 2, (size - 1) / 2
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return mask


def make_shape(colour: str, shape: str, footprint: tuple[int, int, int], image_size: int) -> Shape:
    """The object `shape` drawn in its (size, x0, y0) footprint, with the tight box and area of its mask."""
    size, x0, y0 = footprint
    mask = shape_mask(shape, size, x0, y0, image_size)
    box = tuple(int(v) for v in mask.getbbox())  # type: ignore[union-attr]
    return Shape(colour, shape, size, x0, y0, box, mask.histogram()[255])  # type: ignore[arg-type]


@dataclass(frozen=True)
class Placement:
    """Shape sizes in [min_size, max_size] and footprint corners and sizes on a `grid`-pixel lattice (1: any pixel);
    a coarse grid and larger shapes make an easier task (fewer distinct boxes, more tolerance per pixel)."""

    min_size: int = MIN_SIZE
    max_size: int = MAX_SIZE
    grid: int = 1


def place_footprints(
    rng: np.random.Generator, count: int, image_size: int, tries: int = 50, placement: Placement = Placement()
) -> list[tuple[int, int, int]] | None:
    """`count` non-overlapping (size, x0, y0) footprints with GAP pixels between them, or None if none fit."""
    g = placement.grid
    placed: list[tuple[int, int, int]] = []
    for _ in range(tries):
        if len(placed) == count:
            break
        s = g * int(rng.integers(-(-placement.min_size // g), placement.max_size // g + 1))
        x, y = (g * int(v) for v in rng.integers(0, (image_size - s) // g + 1, size=2))
        if all(
            x + s + GAP <= px or px + ps + GAP <= x or y + s + GAP <= py or py + ps + GAP <= y for ps, px, py in placed
        ):
            placed.append((s, x, y))
    return placed if len(placed) == count else None


def simple_expressions(objects: Sequence[Shape]) -> list[tuple[str, int]]:
    """'the <colour> <shape>' for every object (colour+shape is unique within an image)."""
    return [(f"the {o.colour} {o.shape}", i) for i, o in enumerate(objects)]


def beats(winner: Shape, rival: Shape, word: str) -> bool:
    """Whether `winner` is clearly the `word` one of the two, so no reading (area or extent) disagrees."""
    if word == "largest":
        return winner.area >= AREA_RATIO * rival.area and winner.extent >= rival.extent
    if word == "smallest":
        return beats(rival, winner, "largest")
    if word == "leftmost":
        return winner.cx + POSITION_MARGIN <= rival.cx
    if word == "rightmost":
        return winner.cx >= rival.cx + POSITION_MARGIN
    raise ValueError(f"unknown superlative {word!r}; expected one of {SUPERLATIVES}")


def superlative_expressions(objects: Sequence[Shape]) -> list[tuple[str, int]]:
    """'the <largest|smallest|leftmost|rightmost> <shape | colour shape | shape word>' where one object beats
    every other member of a group of at least two."""
    groups = [("shape", list(range(len(objects))))]
    groups += [(f"{c} shape", [i for i, o in enumerate(objects) if o.colour == c]) for c in COLOURS]
    groups += [(s, [i for i, o in enumerate(objects) if o.shape == s]) for s in SHAPES]
    out = []
    for word, (noun, members) in itertools.product(SUPERLATIVES, groups):
        if len(members) < 2:
            continue
        out += [
            (f"the {word} {noun}", i)
            for i in members
            if all(beats(objects[i], objects[k], word) for k in members if k != i)
        ]
    return out


def relational_expressions(objects: Sequence[Shape]) -> list[tuple[str, int]]:
    """'the <target> <relation> the <colour> <shape>', boxes strictly on one side of the anchor's box.

    The target is named by its shape word alone only when every other object of that shape is strictly on the
    opposite side of the anchor; otherwise by colour+shape, which is unique on its own.
    """
    out = []
    for (t, target), (a, anchor) in itertools.permutations(enumerate(objects), 2):
        for relation, (holds, opposite) in RELATIONS.items():
            if not holds(target.box, anchor.box):
                continue
            others = [o for k, o in enumerate(objects) if k not in (t, a) and o.shape == target.shape]
            alone = all(RELATIONS[opposite][0](o.box, anchor.box) for o in others)
            name = target.shape if alone else f"{target.colour} {target.shape}"
            out.append((f"the {name} {relation} the {anchor.colour} {anchor.shape}", t))
    return out


EXPRESSIONS = {
    "simple": simple_expressions,
    "superlative": superlative_expressions,
    "relational": relational_expressions,
}


def _scene(
    rng: np.random.Generator, family: str, split: str, image_size: int, placement: Placement
) -> tuple[list[Shape], str, int]:
    """Draw shapes until `family` can refer to one (a held-out pair in `ood`); return (objects, expression, target)."""
    while True:
        count = int(rng.integers(1 if family == "simple" else 2, 4))
        footprints = place_footprints(rng, count, image_size, placement=placement)
        if footprints is None:
            continue
        if split == "ood":
            held = sorted(HELD_OUT)
            first = held[int(rng.integers(len(held)))]
            rest = [p for p in ALL_PAIRS if p != first]
            pairs = [first] + [rest[i] for i in rng.choice(len(rest), count - 1, replace=False)]
        else:
            pairs = [TRAIN_PAIRS[i] for i in rng.choice(len(TRAIN_PAIRS), count, replace=False)]
        objects = [make_shape(c, shape, footprint, image_size) for (c, shape), footprint in zip(pairs, footprints)]
        candidates = [
            (e, t)
            for e, t in EXPRESSIONS[family](objects)
            if split != "ood" or (objects[t].colour, objects[t].shape) in HELD_OUT
        ]
        if candidates:
            expression, target = candidates[int(rng.integers(len(candidates)))]
            return objects, expression, target


def render(rng: np.random.Generator, objects: Sequence[Shape], image_size: int) -> Image.Image:
    """Dark random background, shapes painted through their masks, then Gaussian noise on every pixel."""
    background = rng.integers(0, BACKGROUND_MAX + 1, size=3)
    image = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in background))
    for o in objects:
        image.paste(COLOURS[o.colour], (0, 0), shape_mask(o.shape, o.size, o.x0, o.y0, image_size))
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0.0, NOISE_SIGMA, size=(image_size, image_size, 3))
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def write_split(out_dir: str, split: str, records: Iterable[tuple[dict, dict[str, Image.Image]]]) -> str:
    """Write each (record, {image path under images/: image}) as `<out_dir>/<split>.jsonl` + PNGs; return the path.

    Every file is written under a temporary name and renamed into place, images before the jsonl that names them,
    so an interrupted run leaves no partial file and no jsonl line pointing at a missing image (an existing jsonl
    stays as it was).
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{split}.jsonl")
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8", newline="\n") as f:
            for record, images in records:
                for relative, image in images.items():
                    target = os.path.join(image_folder(out_dir), relative)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    image.save(f"{target}.tmp", format="PNG")
                    os.replace(f"{target}.tmp", target)
                f.write(json.dumps(record) + "\n")
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
    return path


def make_record(
    index: int, seed: int, split: str, families: Sequence[str], image_size: int, placement: Placement = Placement()
) -> tuple[dict, Image.Image]:
    """One VLM-R1 jsonl record and its image; a pure function of (seed, split, index, placement)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    family = families[int(rng.integers(len(families)))]
    objects, expression, target = _scene(rng, family, split, image_size, placement)
    image = render(rng, objects, image_size)
    name = f"{split}_{index:06d}"
    box = objects[target].box
    record = {
        "id": name,
        "image": f"{split}/{name}.png",
        "conversations": [
            {"from": "human", "value": f"<image>{PROMPT_PREFIX}{expression}."},
            {"from": "gpt", "value": f"[{box[0]}, {box[1]}, {box[2]}, {box[3]}]"},
        ],
        "family": family,
        "objects": [{"colour": o.colour, "shape": o.shape, "box": list(o.box)} for o in objects],
    }
    return record, image


def image_folder(out_dir: str) -> str:
    """The image folder that goes with the jsonl files `generate` writes into `out_dir`."""
    return os.path.join(out_dir, IMAGE_DIR)


def generate(
    out_dir: str,
    n: int,
    seed: int,
    split: str = "train",
    families: Sequence[str] = ("simple",),
    image_size: int = 112,
    placement: Placement = Placement(),
) -> str:
    """Write `n` samples as `<out_dir>/<split>.jsonl` + `<out_dir>/images/<split>/*.png`; return the jsonl path.

    Same arguments give byte-identical files; written atomically (`write_split`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {list(families)}")
    if image_size < 2 * placement.max_size:
        raise ValueError(f"image_size must be at least {2 * placement.max_size} to fit the shapes, got {image_size}")
    if not 0 < placement.min_size <= placement.max_size or placement.grid < 1:
        raise ValueError(f"placement needs 0 < min_size <= max_size and grid >= 1, got {placement}")
    records = (make_record(index, seed, split, tuple(families), image_size, placement) for index in range(n))
    return write_split(out_dir, split, ((record, {record["image"]: image}) for record, image in records))


def write_default_dataset(
    out_dir: str,
    n_train: int,
    n_val: int,
    n_ood: int,
    seed: int,
    families: Sequence[str] = ("simple",),
    image_size: int = 112,
    placement: Placement = Placement(),
) -> dict[str, str]:
    """The train / val / ood splits sharing one image folder; returns {split: jsonl path}."""
    sizes = {"train": n_train, "val": n_val, "ood": n_ood}
    return {split: generate(out_dir, n, seed, split, families, image_size, placement) for split, n in sizes.items()}


def corpus_strings() -> list[str]:
    """Every string the task can put in a prompt or an answer, so a compact tokenizer can be trained to cover it."""
    expressions = {f"the {c} {s}" for c, s in ALL_PAIRS}
    nouns = ["shape", *(f"{c} shape" for c in COLOURS), *SHAPES]
    expressions |= {f"the {w} {n}" for w, n in itertools.product(SUPERLATIVES, nouns)}
    targets = [*SHAPES, *(f"{c} {s}" for c, s in ALL_PAIRS)]
    expressions |= {f"the {t} {r} the {c} {s}" for t, r, (c, s) in itertools.product(targets, RELATIONS, ALL_PAIRS)}
    answer_alphabet = "[" + ", ".join(str(d) for d in range(10)) + "]"
    return [PROMPT_PREFIX + e + "." for e in sorted(expressions)] + [answer_alphabet]
