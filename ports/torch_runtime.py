"""Run an exported release folder with transformers on an Ascend NPU, a CUDA GPU or the CPU.

Prompts are built exactly as in training: VLM-R1's single user turn (images first, then the text, optionally in
the task's question template) rendered with the release's own chat template by our tokenizer, and images
processed by our PIL-bicubic pipeline (the one the policy was trained on) with the release's min/max pixels.
This needs no torchvision, which transformers 5.x's `AutoProcessor` requires for Qwen2.5-VL's video processor.

torch-npu breaks a plain `import torch` where CANN is missing (docs/facts.md: torch-npu), so torch is imported with
device-backend autoload off and torch_npu is imported explicitly, its failures caught.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlmr1_jax.extras import require_torch_extra
from vlmr1_jax.models.qwen2_5_vl.config import Qwen25VLConfig, from_hf_config
from vlmr1_jax.models.qwen2_5_vl.image import preprocess_image
from vlmr1_jax.models.qwen2_5_vl.prompts import build_messages
from vlmr1_jax.processing.image import load_image
from vlmr1_jax.processing.tokenizer import Tokenizer
from vlmr1_jax.rl.sampler import default_banned_ids

DEVICES = ("auto", "cpu", "cuda", "npu")
ImageInput = str | os.PathLike | Image.Image | np.ndarray


def import_torch():
    """`import torch` with device-backend autoload disabled, so a torch-npu without CANN cannot break it."""
    require_torch_extra("the torch backend")
    os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
    import torch

    return torch


def npu_unavailable_reason() -> str | None:
    """None when torch_npu imports and sees an NPU, else why not."""
    torch = import_torch()
    try:
        import torch_npu  # noqa: F401 -- registers the "npu" device with torch
    except (ImportError, OSError, RuntimeError) as e:
        return f"torch_npu does not import ({type(e).__name__}: {e})"
    try:
        if not torch.npu.is_available():
            return "torch_npu imports but torch.npu.is_available() is False (no device or driver)"
    except (AttributeError, RuntimeError) as e:
        return f"torch.npu is not usable ({type(e).__name__}: {e})"
    return None


def pick_device(device: str = "auto") -> str:
    """'auto' -> npu if usable, else cuda, else cpu; an explicitly named device must be usable."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {DEVICES}")
    torch = import_torch()
    if device in ("auto", "npu"):
        reason = npu_unavailable_reason()
        if reason is None:
            return "npu"
        if device == "npu":
            raise RuntimeError(
                f"--device npu: {reason}. See docs/deploy-ascend.md (torch-npu must match torch "
                f"and the CANN toolkit must be installed and sourced)."
            )
    if device in ("auto", "cuda"):
        if torch.cuda.is_available():
            return "cuda"
        if device == "cuda":
            raise RuntimeError("--device cuda: torch.cuda.is_available() is False")
    return "cpu"


def build_chat(prompt: str, num_images: int, task_type: str | None = None) -> list[dict[str, Any]]:
    """VLM-R1's user turn: `num_images` image entries, then the text. `task_type` ("rec", "ic", "odLength",
    "default") wraps the text in that task's question template exactly as in training; None keeps it verbatim."""
    if task_type is not None:
        return build_messages(prompt, num_images, task_type)
    return [
        {"role": "user", "content": [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": prompt}]}
    ]


def expand_image_tokens(
    ids: Sequence[int], grids: Sequence[tuple[int, int, int]], image_token_id: int, merge_unit: int
) -> list[int]:
    """Replace the k-th `<|image_pad|>` with t*h*w/merge_unit copies for the k-th image (what the HF processor
    does to the text)."""
    slots = sum(1 for t in ids if t == image_token_id)
    if slots != len(grids):
        raise ValueError(f"the prompt has {slots} image placeholders but {len(grids)} images were given")
    out: list[int] = []
    grid_iter = iter(grids)
    for t in ids:
        out.extend([t] * (int(np.prod(next(grid_iter))) // merge_unit) if t == image_token_id else [t])
    return out


def mm_token_type_ids(input_ids: Any, cfg: Qwen25VLConfig) -> Any:
    """The processor's modality ids per token (transformers 5.x): 1 = image token, 2 = video token, 0 = text."""
    return (input_ids == cfg.image_token_id).long() + 2 * (input_ids == cfg.video_token_id).long()


@dataclasses.dataclass
class TorchRuntime:
    """A loaded release: the transformers model on its device, our tokenizer and the processor settings."""

    model: Any
    tokenizer: Tokenizer
    cfg: Qwen25VLConfig
    device: str
    min_pixels: int
    max_pixels: int

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str = "auto", dtype: str | None = None) -> TorchRuntime:
        """Load `model_dir` on `device`; `dtype` ("bfloat16", "float16", "float32") defaults to float32 on the
        CPU and to the release's torch_dtype on an accelerator."""
        torch = import_torch()
        from transformers import Qwen2_5_VLForConditionalGeneration

        folder = Path(model_dir)
        config = json.loads((folder / "config.json").read_text())
        preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
        device = pick_device(device)  # imports torch_npu when the NPU is used
        dtype = dtype or ("float32" if device == "cpu" else config.get("torch_dtype", "bfloat16"))
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=getattr(torch, dtype))
        return cls(
            model=model.to(device).eval(),
            tokenizer=Tokenizer.load(folder),
            cfg=from_hf_config(config),
            device=device,
            min_pixels=preprocessor["min_pixels"],
            max_pixels=preprocessor["max_pixels"],
        )

    def prompt_text(self, prompt: str, num_images: int, task_type: str | None = None) -> str:
        """The rendered chat prompt (one `<|image_pad|>` per image, generation prompt appended)."""
        return self.tokenizer.apply_chat_template(build_chat(prompt, num_images, task_type), add_generation_prompt=True)

    def _encode(
        self, images: Sequence[ImageInput], prompt: str, task_type: str | None
    ) -> tuple[list[int], list[np.ndarray], list[tuple[int, int, int]]]:
        """One prompt's token ids (image placeholders expanded), pixel rows per image, and grids."""
        pixels, grids = [], []
        for image in images:
            if isinstance(image, (str, os.PathLike)):
                image = load_image(image)
            values, grid = preprocess_image(image, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
            pixels.append(values)
            grids.append(grid)
        ids = expand_image_tokens(
            self.tokenizer.encode(self.prompt_text(prompt, len(images), task_type)),
            grids,
            self.cfg.image_token_id,
            self.cfg.vision.merge_unit,
        )
        return ids, pixels, grids

    def inputs(self, images: Sequence[ImageInput], prompt: str, task_type: str | None = None) -> dict[str, Any]:
        """The model's keyword inputs for one prompt: input_ids, attention_mask, pixel_values, image_grid_thw."""
        return self.batch_inputs([(images, prompt)], task_type)

    def batch_inputs(
        self, requests: Sequence[tuple[Sequence[ImageInput], str]], task_type: str | None = None
    ) -> dict[str, Any]:
        """Keyword inputs for several (images, prompt) requests, left-padded with the pad token as VLM-R1's
        processor does; image rows and grids are concatenated in request order."""
        torch = import_torch()
        encoded = [self._encode(images, prompt, task_type) for images, prompt in requests]
        length = max(len(ids) for ids, _, _ in encoded)
        input_ids = torch.full((len(encoded), length), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, (ids, _, _) in enumerate(encoded):
            input_ids[row, length - len(ids) :] = torch.tensor(ids)
            mask[row, length - len(ids) :] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        pixels = [p for _, rows, _ in encoded for p in rows]
        if pixels:
            batch["pixel_values"] = torch.from_numpy(np.concatenate(pixels)).to(self.model.dtype)
            batch["image_grid_thw"] = torch.tensor([g for _, _, grids in encoded for g in grids])
            if self._takes_token_types():
                batch["mm_token_type_ids"] = mm_token_type_ids(input_ids, self.cfg)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _takes_token_types(self) -> bool:
        """transformers >= 5 computes M-RoPE only when given `mm_token_type_ids` (else text positions for image
        tokens); older versions have no such argument and reject it."""
        return "mm_token_type_ids" in inspect.signature(self.model.forward).parameters

    def generate_from(
        self,
        batch: dict[str, Any],
        max_new_tokens: int = 256,
        greedy: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
        seed: int = 0,
    ) -> list[list[int]]:
        """Generated token ids per row of `batch_inputs` output, through the first <|im_end|> / <|endoftext|>.
        Vision placeholder tokens are never generated (as in the JAX sampler). Sampling defaults are VLM-R1's
        rollout ones (temperature 1, top_k 50, top_p 1)."""
        torch = import_torch()
        from transformers import GenerationConfig

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        eos = list(self.tokenizer.eos_ids)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            eos_token_id=eos,
            pad_token_id=self.tokenizer.pad_id,
            suppress_tokens=list(default_banned_ids(self.cfg)),
            **sampling,
        )
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                **batch, generation_config=config, output_logits=True, return_dict_in_generate=True
            )
        if not all(bool(torch.isfinite(step).all()) for step in out.logits):
            raise ValueError(NONFINITE_LOGITS)
        rows = []
        for row in out.sequences[:, batch["input_ids"].shape[1] :].tolist():
            end = next((i for i, t in enumerate(row) if t in eos), len(row) - 1)
            rows.append(row[: end + 1])
        return rows

    def generate_ids(
        self,
        images: Sequence[ImageInput],
        prompt: str,
        max_new_tokens: int = 256,
        greedy: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
        seed: int = 0,
        task_type: str | None = None,
    ) -> list[int]:
        """Generated token ids (prompt excluded) for one prompt; see `generate_from`."""
        return self.generate_from(
            self.inputs(images, prompt, task_type), max_new_tokens, greedy, temperature, top_p, top_k, seed
        )[0]

    def generate(
        self, images: Sequence[ImageInput], prompt: str, max_new_tokens: int = 256, greedy: bool = True, **kwargs: Any
    ) -> str:
        """The decoded completion (special tokens dropped); kwargs as in `generate_ids`."""
        ids = self.generate_ids(images, prompt, max_new_tokens, greedy, **kwargs)
        return self.tokenizer.decode(ids, skip_special_tokens=True)


NONFINITE_LOGITS = (
    "the model's logits are not finite (inf/NaN): its weights overflow in this dtype (float16 has no headroom for "
    "some layers: see `vlmr1 check-export --forward`) or are broken; its text would be garbage"
)


def generate(
    model_dir: str | os.PathLike,
    images: Sequence[ImageInput],
    prompt: str,
    max_new_tokens: int = 256,
    greedy: bool = True,
    device: str = "auto",
    **kwargs: Any,
) -> str:
    """Load `model_dir` and complete one VLM-R1 style prompt (greedy by default, else sampled)."""
    return TorchRuntime.load(model_dir, device).generate(images, prompt, max_new_tokens, greedy, **kwargs)
