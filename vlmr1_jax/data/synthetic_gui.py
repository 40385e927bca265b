"""Built-in synthetic GUI defect data in VLM-R1's GUI shape (docs/facts.md: VLM-R1 GUI and OVD data): two
screenshots per sample, before and after one tap.

The first screenshot is an app's home screen: a status bar, a grey header and 2-4 coloured buttons, each with a
white shape icon. The question names the tapped button and the page it should open; the second screenshot shows
the defect, and the answer is one of VLM-R1's two GUI labels:
- "Operation No Response": the same home screen, the tapped button drawn pressed (darker), no page opened;
- "Unexpected Task Result": another button's page opened (its colour in the header, its icon in the body).
Questions carry no `<image>` tokens (as VLM-R1's GUI file); the recipe scores them with `all_match`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from vlmr1_jax.data.synthetic import COLOURS, SHAPES, shape_mask, write_split

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]  # [x1, y1, x2, y2), as the REC boxes

SPLITS = ("train", "val")
NO_RESPONSE, WRONG_PAGE = "Operation No Response", "Unexpected Task Result"
ANSWERS = (NO_RESPONSE, WRONG_PAGE)
STATUS_BAR: RGB = (30, 30, 30)
HOME_HEADER: RGB = (128, 128, 128)
WHITE: RGB = (255, 255, 255)
PRESSED = 0.6  # a pressed button's colour, as a fraction of its normal colour
MIN_BUTTONS, MAX_BUTTONS = 2, 4
QUESTION = (
    "The two screenshots show a mobile app before and after one operation. Operation: tap the {button} button, "
    "which should open the {button} page. The operation did not work as expected. Which defect does the second "
    f'screenshot show? Answer "{NO_RESPONSE}" if the app stayed on the same screen, or "{WRONG_PAGE}" if a '
    "different page opened."
)


def layout(image_size: int) -> dict[str, Box]:
    """Screen regions as [x1, y1, x2, y2) boxes: status bar, header, and the four button slots (a 2 x 2 grid)."""
    s = image_size
    status, header, margin = s // 14, s // 4, s // 14
    width, height = (s - 3 * margin) // 2, (s - header - 3 * margin) // 2
    regions = {"status": (0, 0, s, status), "header": (0, status, s, header)}
    for k in range(MAX_BUTTONS):
        x, y = margin + (k % 2) * (width + margin), header + margin + (k // 2) * (height + margin)
        regions[f"slot{k}"] = (x, y, x + width, y + height)
    return regions


def _frame(image_size: int, body: RGB, header: RGB) -> Image.Image:
    regions = layout(image_size)
    image = Image.new("RGB", (image_size, image_size), body)
    draw = ImageDraw.Draw(image)
    draw.rectangle(_inclusive(regions["status"]), fill=STATUS_BAR)
    draw.rectangle(_inclusive(regions["header"]), fill=header)
    return image


def _inclusive(box: Sequence[int]) -> Box:
    """PIL's rectangle takes inclusive corners."""
    return box[0], box[1], box[2] - 1, box[3] - 1


def _icon(image: Image.Image, shape: str, box: Sequence[int], fill: RGB) -> None:
    """A `shape` icon centred in `box`, half its smaller side."""
    size = min(box[2] - box[0], box[3] - box[1]) // 2
    x0, y0 = (box[0] + box[2] - size) // 2, (box[1] + box[3] - size) // 2
    image.paste(fill, (0, 0), shape_mask(shape, size, x0, y0, image.width))


def home_screen(image_size: int, body: RGB, buttons: list[dict], pressed: int | None = None) -> Image.Image:
    """The home screen with `buttons` ({colour, shape, box}); button `pressed` (an index) drawn darker."""
    image = _frame(image_size, body, HOME_HEADER)
    draw = ImageDraw.Draw(image)
    for k, button in enumerate(buttons):
        red, green, blue = COLOURS[button["colour"]]
        if k == pressed:
            red, green, blue = int(PRESSED * red), int(PRESSED * green), int(PRESSED * blue)
        draw.rectangle(_inclusive(button["box"]), fill=(red, green, blue))
        _icon(image, button["shape"], button["box"], WHITE)
    return image


def page_screen(image_size: int, body: RGB, colour: str, shape: str) -> Image.Image:
    """The page a button opens: its colour in the header, its icon large in the body."""
    image = _frame(image_size, body, COLOURS[colour])
    regions = layout(image_size)
    content = (0, regions["header"][3], image_size, image_size)
    _icon(image, shape, content, COLOURS[colour])
    return image


def make_record(index: int, seed: int, split: str, image_size: int) -> tuple[dict, dict[str, Image.Image]]:
    """One GUI jsonl record and its {path: screenshot} pair; a pure function of (seed, split, index)."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    regions = layout(image_size)
    count = int(rng.integers(MIN_BUTTONS, MAX_BUTTONS + 1))
    slots = sorted(int(k) for k in rng.choice(MAX_BUTTONS, count, replace=False))
    # Distinct colours, so the header colour of an opened page names one button.
    colours = [str(c) for c in rng.choice(list(COLOURS), count, replace=False)]
    shapes = [SHAPES[int(i)] for i in rng.integers(len(SHAPES), size=count)]
    buttons = [{"colour": c, "shape": s, "box": list(regions[f"slot{k}"])} for c, s, k in zip(colours, shapes, slots)]
    red, green, blue = (int(v) for v in rng.integers(225, 256, size=3))
    body = (red, green, blue)
    tapped = int(rng.integers(count))
    answer = ANSWERS[int(rng.integers(len(ANSWERS)))]
    before = home_screen(image_size, body, buttons)
    if answer == NO_RESPONSE:
        opened = None
        after = home_screen(image_size, body, buttons, pressed=tapped)
    else:
        opened = [k for k in range(count) if k != tapped][int(rng.integers(count - 1))]
        after = page_screen(image_size, body, colours[opened], shapes[opened])
    name = f"{split}_{index:06d}"
    paths = [f"{split}/{name}_before.png", f"{split}/{name}_after.png"]
    button = f"{colours[tapped]} {shapes[tapped]}"
    record = {
        "id": name,
        "image": paths,
        "conversations": [
            {"from": "human", "value": QUESTION.format(button=button)},
            {"from": "gpt", "value": answer},
        ],
        "buttons": buttons,
        "tapped": tapped,
        "opened": opened,
    }
    return record, dict(zip(paths, (before, after)))


def generate(out_dir: str, n: int, seed: int, split: str = "train", image_size: int = 112) -> str:
    """Write `n` samples as `<out_dir>/<split>.jsonl` + `<out_dir>/images/<split>/*.png` (two per sample); return
    the jsonl path. Same arguments give byte-identical files; written atomically (`write_split`)."""
    if split not in SPLITS:
        raise ValueError(f"--split for --task gui must be one of {SPLITS}, got {split!r}")
    if image_size < 56 or image_size % 28:
        raise ValueError(f"--image-size for --task gui must be a multiple of 28 and >= 56, got {image_size}")
    return write_split(out_dir, split, (make_record(index, seed, split, image_size) for index in range(n)))
