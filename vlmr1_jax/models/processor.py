"""The processor's family-independent contract: what a family turns prompts and images into, and the batch type.

A family's `Processor` (`ModelFamily.processor`) owns everything between a decoded image and the model's inputs:
resizing and patching, the prompt template, how many tokens an image becomes, the positions (e.g. M-RoPE) and the
layout of the vision arrays. Callers see only `PromptBatch`: the text arrays every decoder takes, plus a
family-defined dict of vision arrays that goes to the family's own `encode_vision`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

# One preprocessed image: its pixel rows and a family-defined grid (Qwen2.5-VL: grid_thw), which also travels to
# rewards as the `image_grid_thw` column.
ProcessedImage = tuple[np.ndarray, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """P left-padded prompts and their images, ready for `jax.device_put`."""

    input_ids: np.ndarray  # [P, L] int32
    attention_mask: np.ndarray  # [P, L] int32
    positions: np.ndarray  # [3, P, L] int32 rope positions (three equal rows for a 1-D rope)
    next_position: np.ndarray  # [P] int32: position of the first generated token
    vision_gather: np.ndarray  # [P, L] int32 row of `encode_vision`'s output per image token, -1 elsewhere
    vision: dict[str, np.ndarray]  # the family's vision arrays, split over the batch devices on axis 0; {}: no image
    image_grids: tuple[tuple[tuple[int, ...], ...], ...]  # per prompt, the grid of each image

    def batch_axes(self) -> dict[str, int]:
        """The batch axis of each array of `arrays()`: the text arrays' own, axis 0 for every vision array."""
        return {**dict.fromkeys(self.vision, 0), **TEXT_BATCH_AXIS}

    def arrays(self) -> dict[str, np.ndarray]:
        """The device-side arrays: the text fields and the family's vision arrays, flat."""
        text = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("vision", "image_grids")
        }
        return {**text, **self.vision}


# Batch axis of the text arrays of `PromptBatch.arrays()`; every vision array is split on axis 0.
TEXT_BATCH_AXIS = {"input_ids": 0, "attention_mask": 0, "positions": 1, "next_position": 0, "vision_gather": 0}


def vision_inputs(arrays: Mapping[str, Any]) -> dict[str, Any]:
    """The family's vision arrays among a batch's arrays (`PromptBatch.arrays()`, on the host or the devices);
    empty for a batch without images, whose prompts then need no vision compute."""
    return {name: value for name, value in arrays.items() if name not in TEXT_BATCH_AXIS}


def length_bucket(n: int, multiple: int = 32) -> int:
    """Round a prompt length up to a multiple of `multiple`, so a few programs serve every batch."""
    return max(multiple, -(-n // multiple) * multiple)


def max_pixels_or_default(max_pixels: int | None, processor: Processor) -> int:
    """A run's image budget: `max_pixels` when set, else the family's own default (`Processor.default_max_pixels`)."""
    return processor.default_max_pixels if max_pixels is None else max_pixels


class ChatTemplater(Protocol):
    """Anything with our `Tokenizer.apply_chat_template` signature."""

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str: ...


class Processor(Protocol):
    """A family's processor (VLM-R1's VLM module, host side)."""

    @property
    def reward_variants(self) -> Mapping[str, str]:
        """The family's own variant of a recipe's reward (VLM-R1's `select_reward_func`), by the recipe's name."""
        ...

    @property
    def question_templates(self) -> Mapping[str, str]:
        """VLM-R1's question templates of the family by task type ("{Question}" marks the problem text), always
        with a "default" one: what `prompt_messages` applies and what `vlmr1 infer --task-type` offers."""
        ...

    @property
    def vision_tokens(self) -> Mapping[str, str]:
        """Model config id field -> its token in the tokenizer, for every image placeholder and structure token of
        the family's prompts: tokenizer and config must agree on each, and the policy never samples them."""
        ...

    @property
    def added_tokens(self) -> tuple[str, ...]:
        """Special tokens the family's prompts need beyond a Qwen2.x tokenizer's (a compact tokenizer for the family
        is `tokenizer.with_special_tokens(added_tokens, **tokenizer_config)`)."""
        ...

    @property
    def tokenizer_config(self) -> Mapping[str, Any]:
        """tokenizer_config.json entries that go with `added_tokens`."""
        ...

    @property
    def pad_token_field(self) -> str:
        """The model config field that holds the tokenizer's pad id (set from the tokenizer for presets)."""
        ...

    @property
    def default_max_pixels(self) -> int:
        """The image budget (`data.max_pixels`) of the family's own preprocessing when a recipe leaves it unset."""
        ...

    @property
    def rec_eval(self) -> Mapping[str, Any]:
        """The family's own REC evaluation protocol as `eval.protocols.RecProtocol` fields (task_type,
        max_new_tokens, extract_box, rescale), the default of `vlmr1 eval rec`; empty: VLM-R1's `r1`."""
        ...

    def for_config(self, cfg: Any) -> Processor:
        """This processor for a model of config `cfg` (e.g. InternVL's tile size); `family.processor_of(cfg)`."""
        ...

    def preprocessor_problems(self, pre: Mapping[str, Any], cfg: Any) -> list[str]:
        """What is wrong in a release's preprocessor_config.json `pre` for a model of config `cfg` ([] if
        nothing): `vlmr1 check-export` reports these."""
        ...

    def preprocess_image(self, image: Image.Image | np.ndarray, *, min_pixels: int, max_pixels: int) -> ProcessedImage:
        """A decoded RGB image -> its pixel rows and grid (`min_pixels` / `max_pixels` bound the resize)."""
        ...

    def image_tokens(self, grid: Sequence[int]) -> int:
        """How many prompt tokens one image placeholder becomes."""
        ...

    def image_grid(self, height: int, width: int, *, min_pixels: int, max_pixels: int) -> tuple[int, ...]:
        """The grid `preprocess_image` gives an image of this size, without its pixels; ValueError where the
        processor cannot take it."""
        ...

    def model_frame(self, grid: Sequence[int]) -> tuple[int, int] | None:
        """(height, width) of the frame the model's box coordinates live in, for an image of this grid; None when
        the family's boxes are not in resized pixels (rewards then compare them unscaled)."""
        ...

    def prompt_messages(self, problem: str, num_images: int, task_type: str | None) -> list[dict[str, Any]]:
        """VLM-R1's conversation for a prompt (its `prompt` column): the question template `task_type` names (the
        "default" one for a name it lacks; a `task_type` containing "{Question}" is itself the template, so
        "{Question}" keeps the problem verbatim), and the image entries."""
        ...

    def render_prompt(self, tokenizer: ChatTemplater, problem: str, num_images: int, task_type: str | None) -> str:
        """The prompt text the policy sees: `prompt_messages` through the chat template, with image placeholders."""
        ...

    def hf_preprocessor_config(self, cfg: Any) -> dict[str, Any]:
        """The preprocessor_config.json of an HF release of a model with config `cfg`."""
        ...

    def build_prompt_batch(
        self,
        prompt_ids: Sequence[Sequence[int]],
        images: Sequence[Sequence[ProcessedImage]],
        cfg: Any,
        *,
        pad_id: int,
        length: int | None = None,
    ) -> PromptBatch:
        """Expand each image placeholder, left-pad to `length` (else a bucket), compute positions and vision arrays."""
        ...

    def hf_model_inputs(self, batch: PromptBatch) -> dict[str, np.ndarray]:
        """Every keyword array transformers' model of the family takes for `batch`'s prompts besides `input_ids`
        and `attention_mask` (Qwen: pixel_values, image_grid_thw, mm_token_type_ids), in transformers' layout and
        order; {} for a batch without images. ports/ run transformers on our prompt batches with these (the parity
        check, the torch runtime), so both sides see the same pixels and tokens."""
        ...
