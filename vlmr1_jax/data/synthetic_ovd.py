"""Built-in synthetic open-vocabulary detection (OVD) data in VLM-R1's D³ shape, for the `odLength` reward
(docs/facts.md: VLM-R1 GUI and OVD data).

Each image holds 2-4 coloured shapes (a label such as "red circle" may appear more than once). The query lists
every label present plus 1-3 absent ones (D³'s negative descriptions); in about one sample in ten only absent
labels are queried and the answer is "None". The answer is a ```` ```json ``` ```` list of
`{"bbox_2d": [x1, y1, x2, y2], "label": ...}` with tight pixel boxes (x2 / y2 exclusive); image sides are multiples
of 28, so the processor keeps their size and the boxes stay in the frame the model sees.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from vlmr1_jax.data.synthetic import ALL_PAIRS, MAX_SIZE, make_shape, place_footprints, render, write_split

SPLITS = ("train", "val")
MIN_OBJECTS, MAX_OBJECTS = 2, 4
MAX_NEGATIVES = 3
NONE_RATE = 0.1  # share of samples that query only absent labels (answer "None")
NO_TARGETS = "None"
# VLM-R1's OVD question (the maintainers' example of the D³ training data), with the query list filled in.
QUESTION = (
    "Please carefully check the image and detect the following objects: {targets}. Output the bbox coordinates "
    "of detected objects in JSON format in <answer></answer>. The bbox coordinate format should be: \n```json\n"
    '[{{"bbox_2d": [x1, y1, x2, y2], "label": "object name"}}]\n```\n. If no targets are detected in the image, '
    'simply respond with "None".'
)


def label(colour: str, shape: str) -> str:
    return f"{colour} {shape}"


def answer_text(boxes: list[dict]) -> str:
    """The ground-truth answer: the boxes as a ```` ```json ``` ```` block, or "None" when there are none."""
    return f"```json\n{json.dumps(boxes)}\n```" if boxes else NO_TARGETS


def make_record(index: int, seed: int, split: str, image_size: int) -> tuple[dict, Image.Image]:
    """One OVD jsonl record and its image; a pure function of (seed, split, index)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    footprints = None
    while footprints is None:
        footprints = place_footprints(rng, int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)), image_size)
    pairs = [ALL_PAIRS[i] for i in rng.integers(len(ALL_PAIRS), size=len(footprints))]
    objects = [make_shape(c, s, footprint, image_size) for (c, s), footprint in zip(pairs, footprints)]
    image = render(rng, objects, image_size)
    present = sorted({label(o.colour, o.shape) for o in objects})
    absent = sorted({label(c, s) for c, s in ALL_PAIRS} - set(present))
    negatives = [absent[i] for i in rng.choice(len(absent), int(rng.integers(1, MAX_NEGATIVES + 1)), replace=False)]
    positives = [] if rng.random() < NONE_RATE else present
    targets = [*positives, *negatives]
    rng.shuffle(targets)
    found = [o for o in objects if label(o.colour, o.shape) in positives]
    found.sort(key=lambda o: (targets.index(label(o.colour, o.shape)), o.box[1], o.box[0]))  # query order
    boxes = [{"bbox_2d": list(o.box), "label": label(o.colour, o.shape)} for o in found]
    name = f"{split}_{index:06d}"
    record = {
        "id": name,
        "image": f"{split}/{name}.png",
        "conversations": [
            {"from": "human", "value": "<image>" + QUESTION.format(targets=str(targets))},
            {"from": "gpt", "value": answer_text(boxes)},
        ],
        "objects": [{"label": label(o.colour, o.shape), "box": list(o.box)} for o in objects],
        "negatives": sorted(negatives),
    }
    return record, image


def generate(out_dir: str, n: int, seed: int, split: str = "train", image_size: int = 112) -> str:
    """Write `n` samples as `<out_dir>/<split>.jsonl` + `<out_dir>/images/<split>/*.png`; return the jsonl path.

    Same arguments give byte-identical files; written atomically (`write_split`).
    """
    if split not in SPLITS:
        raise ValueError(f"--split for --task ovd must be one of {SPLITS}, got {split!r}")
    if image_size < 2 * MAX_SIZE or image_size % 28:
        raise ValueError(
            f"--image-size for --task ovd must be a multiple of 28 and >= {2 * MAX_SIZE}, got {image_size}"
        )
    records = (make_record(index, seed, split, image_size) for index in range(n))
    return write_split(out_dir, split, ((record, {record["image"]: image}) for record, image in records))
