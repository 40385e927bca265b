"""InternVL's processor: images -> 448-px tiles (VLM-R1's dynamic tiling), VLM-R1's InternVL prompt, and prompt
batches with 1-D positions and the tiles' `pixel_values`.

Each image is a grid `(tiles,)`: its tile count, thumbnail included. In the prompt it is `<img>`, 256
`<IMG_CONTEXT>` tokens per tile, `</img>`; `vision_gather` maps the k-th context token of the batch (row-major, as
transformers' `masked_scatter` fills them) to row k of the vision tower's output, tile after tile. The tile budget
(VLM-R1's `max_anyres_num`) is `data.max_pixels // 448**2`: max_pixels bounds the resized image's area for every
family; unset, it is the family's default, 12 tiles (VLM-R1's). Tile size and tokens per tile are the model's
(`vision.image_size`, `num_image_token`): every release has 448 / 256, while tiny test models use small tiles
(`processor.for_config(cfg)`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from vlmr1_jax.models.internvl import prompts
from vlmr1_jax.models.internvl.tiling import (
    DEFAULT_MAX_TILES,
    IMAGE_MEAN,
    IMAGE_STD,
    MIN_TILES,
    TILE_SIZE,
    count_tiles,
    max_tiles_for,
    normalize_tiles,
    tile_image,
)
from vlmr1_jax.models.processor import ChatTemplater, ProcessedImage, PromptBatch, length_bucket

TOKENS_PER_TILE = 256  # (448 / 14 patches)^2 after the 0.5 pixel shuffle: the releases' num_image_token


def tile_bucket(n: int, minimum: int = 4) -> int:
    """Round a tile count up to a bucket (powers of two up to 64, then multiples of 32), so a few vision programs
    serve every batch."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length() if n <= 64 else -(-n // 32) * 32


def build_prompt_batch(
    prompt_ids: Sequence[Sequence[int]],
    images: Sequence[Sequence[ProcessedImage]],
    cfg: Any,
    *,
    pad_id: int,
    length: int | None = None,
    num_tiles: int | None = None,
) -> PromptBatch:
    """Expand each image's `<IMG_CONTEXT>` to `cfg.num_image_token` (256) per tile, left-pad, and stack the tiles.

    `prompt_ids[p]` holds one `<IMG_CONTEXT>` per image of `images[p]` (`render_prompt`'s placeholder). `length` /
    `num_tiles` force the padded sizes (else bucketed); pad tiles are zeros that no token gathers. A batch without
    images has no vision arrays (unless `num_tiles` asks for them), so its programs run no vision tower.
    """
    if len(prompt_ids) != len(images):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(images)} image lists")
    context, tokens, side = cfg.image_token_id, cfg.num_image_token, cfg.vision.image_size
    rows: list[list[int]] = []
    for p, (ids, imgs) in enumerate(zip(prompt_ids, images)):
        slots = sum(1 for t in ids if t == context)
        if slots != len(imgs):
            raise ValueError(f"prompt {p}: {slots} image placeholders (<IMG_CONTEXT>) but {len(imgs)} images")
        tiles = iter(int(g[0]) for _, g in imgs)
        row: list[int] = []
        for t in ids:
            row.extend([t] * (tokens * next(tiles)) if t == context else [t])
        rows.append(row)
    longest = max(map(len, rows))
    length = length_bucket(longest) if length is None else length
    if length < longest:
        raise ValueError(f"prompt of {longest} tokens does not fit the forced length {length}")
    input_ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for p, row in enumerate(rows):
        input_ids[p, length - len(row) :] = row
        mask[p, length - len(row) :] = 1
    # 1-D rope through the M-RoPE decoder: three equal rows; pads at 1 (masked), as transformers' generate sets them.
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int32)
    gather = np.full(input_ids.shape, -1, np.int32)
    is_context = input_ids == context
    gather[is_context] = np.arange(int(is_context.sum()), dtype=np.int32)
    all_images = [img for imgs in images for img in imgs]
    real = sum(int(g[0]) for _, g in all_images)
    padded = tile_bucket(real) if num_tiles is None else num_tiles
    if padded < real:
        raise ValueError(f"num_tiles={padded} is smaller than the {real} tiles of these images")
    pixels = np.zeros((padded, 3, side, side), np.float32)
    wrong = {px.shape[-1] for px, _ in all_images} - {side}
    if wrong:
        raise ValueError(
            f"tiles of {sorted(wrong)} px but the model's vision.image_size is {side}: preprocess with the model's "
            "processor (`processor.for_config(cfg)`)"
        )
    if all_images:
        pixels[:real] = np.concatenate([px for px, _ in all_images])
    return PromptBatch(
        input_ids=input_ids,
        attention_mask=mask,
        positions=np.broadcast_to(positions, (3, *positions.shape)).copy(),
        next_position=mask.sum(1).astype(np.int32),
        vision_gather=gather,
        vision={"pixel_values": pixels} if all_images or num_tiles is not None else {},
        image_grids=tuple(tuple((int(g[0]),) for _, g in imgs) for imgs in images),
    )


class InternVLProcessor:
    """The `Processor` of InternVL (models/processor.py), as VLM-R1's InternVL module prepares inputs, for tiles of
    `tile_size` pixels that become `tokens_per_tile` tokens (the releases': 448, 256)."""

    # VLM-R1's `select_reward_func`: a recipe's reward name -> InternVL's variant (its REC format has no braces).
    reward_variants: ClassVar[Mapping[str, str]] = MappingProxyType({"rec_format": "rec_format_plain"})
    # VLM-R1 asks InternVL with its default question template only.
    question_templates: ClassVar[Mapping[str, str]] = MappingProxyType({"default": prompts.QUESTION_TEMPLATE})
    # VLM-R1's InternVL REC evaluation (`test_rec_r1_internvl.py`) as the fields of an eval protocol: its question
    # template, 1024 greedy tokens, the plain int box of the first answer, no rescale; its 12 tiles are
    # `default_max_pixels`.
    rec_eval: ClassVar[Mapping[str, str | int | bool | Callable[[str], list[float]]]] = MappingProxyType(
        {
            "task_type": "default",
            "max_new_tokens": prompts.EVAL_MAX_NEW_TOKENS,
            "extract_box": prompts.extract_rec_box,
            "rescale": False,
        }
    )
    vision_tokens: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            "image_token_id": prompts.IMAGE_CONTEXT,
            "image_start_token_id": prompts.IMAGE_START,
            "image_end_token_id": prompts.IMAGE_END,
        }
    )
    pad_token_field: ClassVar[str] = "pad_token_id"
    # What a Qwen2.x tokenizer needs for these prompts: `tokenizer.with_special_tokens(added_tokens,
    # **tokenizer_config)`.
    added_tokens: ClassVar[tuple[str, ...]] = prompts.ADDED_TOKENS
    tokenizer_config: ClassVar[Mapping[str, Any]] = MappingProxyType(prompts.TOKENIZER_CONFIG)

    def __init__(self, tile_size: int = TILE_SIZE, tokens_per_tile: int = TOKENS_PER_TILE):
        self.tile_size, self.tokens_per_tile = tile_size, tokens_per_tile

    def for_config(self, cfg: Any) -> InternVLProcessor:
        """The processor of a model with config `cfg`: its tile size and tokens per tile."""
        return _processor(cfg.vision.image_size, cfg.num_image_token)

    @property
    def default_max_pixels(self) -> int:
        """VLM-R1's `max_anyres_num` default, 12 tiles."""
        return DEFAULT_MAX_TILES * self.tile_size**2

    def preprocess_image(self, image: Image.Image | np.ndarray, *, min_pixels: int, max_pixels: int) -> ProcessedImage:
        """The image's normalised tiles [tiles, 3, 448, 448] and grid (tiles,); `min_pixels` is unused (one tile
        is the minimum)."""
        tiles = tile_image(image, max_tiles_for(max_pixels, self.tile_size), self.tile_size)
        return normalize_tiles(tiles), (len(tiles),)

    def image_tokens(self, grid: Sequence[int]) -> int:
        return self.tokens_per_tile * int(grid[0])

    def image_grid(self, height: int, width: int, *, min_pixels: int, max_pixels: int) -> tuple[int, ...]:
        return (count_tiles(width, height, max_tiles_for(max_pixels, self.tile_size), self.tile_size),)

    def model_frame(self, grid: Sequence[int]) -> None:
        """InternVL's REC boxes are not in resized pixels (VLM-R1 scores them unscaled)."""
        return None

    def hf_preprocessor_config(self, cfg: Any) -> dict[str, Any]:
        """transformers' native InternVL preprocessor_config.json (GotOcr2 image processor, tiling on).

        Its tiling chooses the same grid as VLM-R1's, and its PIL backend (`backend="pil"`) gives VLM-R1's pixels
        to float rounding; the default torchvision backend resizes with another bicubic. It advertises InternVL's
        default of 12 tiles, as the released models do (a run's own `data.max_pixels` is not part of the model).
        """
        return {
            "image_processor_type": "GotOcr2ImageProcessor",
            "processor_class": "InternVLProcessor",
            "crop_to_patches": True,
            "min_patches": MIN_TILES,
            "max_patches": DEFAULT_MAX_TILES,
            "size": {"height": self.tile_size, "width": self.tile_size},
            "resample": 3,  # PIL bicubic
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(IMAGE_MEAN),
            "image_std": list(IMAGE_STD),
            "do_convert_rgb": True,
        }

    def preprocessor_problems(self, pre: Mapping[str, Any], cfg: Any) -> list[str]:
        """Tiles of the model's image size, tiling on with an ordered tile budget, mean / std per channel."""
        problems = []
        side = cfg.vision.image_size
        if pre.get("size") != {"height": side, "width": side}:
            problems.append(f"preprocessor_config.json: size {pre.get('size')} != the model's {side}-px tiles")
        if pre.get("crop_to_patches") is not True:
            problems.append("preprocessor_config.json: crop_to_patches must be true (InternVL's dynamic tiling)")
        lo, hi = pre.get("min_patches"), pre.get("max_patches")
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 < lo <= hi):
            problems.append(f"preprocessor_config.json: min_patches {lo} / max_patches {hi} must be 0 < min <= max")
        for key in ("image_mean", "image_std"):
            if len(pre.get(key) or []) != cfg.vision.in_channels:
                problems.append(f"preprocessor_config.json: {key} needs {cfg.vision.in_channels} values")
        return problems

    def hf_model_inputs(self, batch: PromptBatch) -> dict[str, np.ndarray]:
        """transformers' keyword arrays for these prompts: the real tiles (pad tiles dropped) and the positions
        (its forward otherwise counts positions from the first pad of a left-padded row)."""
        real = sum(g[0] for grids in batch.image_grids for g in grids)
        inputs = {"position_ids": batch.positions[0].astype(np.int64)}
        if real:
            inputs["pixel_values"] = batch.vision["pixel_values"][:real]
        return inputs

    def prompt_messages(self, problem: str, num_images: int, task_type: str | None) -> list[dict[str, Any]]:
        return prompts.build_messages(problem, num_images, task_type)

    def render_prompt(self, tokenizer: ChatTemplater, problem: str, num_images: int, task_type: str | None) -> str:
        """VLM-R1 renders InternVL prompts with the model's conversation template; the tokenizer's chat template is
        not used."""
        return prompts.render_prompt(problem, num_images, task_type)

    def build_prompt_batch(
        self,
        prompt_ids: Sequence[Sequence[int]],
        images: Sequence[Sequence[ProcessedImage]],
        cfg: Any,
        *,
        pad_id: int,
        length: int | None = None,
    ) -> PromptBatch:
        return build_prompt_batch(prompt_ids, images, cfg, pad_id=pad_id, length=length)


INTERNVL_PROCESSOR = InternVLProcessor()


@functools.cache
def _processor(tile_size: int, tokens_per_tile: int) -> InternVLProcessor:
    same = (tile_size, tokens_per_tile) == (TILE_SIZE, TOKENS_PER_TILE)
    return INTERNVL_PROCESSOR if same else InternVLProcessor(tile_size, tokens_per_tile)
