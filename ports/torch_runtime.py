"""Run an exported release folder with transformers on an Ascend NPU, a CUDA GPU or the CPU.

Works for every model family: transformers' class is the one the family's `architectures` names, and prompts are
built exactly as in training, by the family's processor: VLM-R1's prompt (images first, then the text, optionally in
the task's question template) rendered with the release's own chat template by our tokenizer, images processed by
our pipeline (the one the policy was trained on) with the release's min/max pixels, and the model's image inputs
from `Processor.hf_model_inputs`. This needs no torchvision, which transformers 5.x's `AutoProcessor` requires for
Qwen2.5-VL's video processor.

torch-npu breaks a plain `import torch` where CANN is missing (docs/facts.md: torch-npu), so torch is imported with
device-backend autoload off and torch_npu is imported explicitly, its failures caught.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlmr1_jax.eval.rec import pixel_bounds
from vlmr1_jax.extras import require_torch_extra
from vlmr1_jax.filenames import CONFIG_FILE
from vlmr1_jax.models.family import family_for_hf_config, processor_of
from vlmr1_jax.models.processor import PromptBatch
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


def hf_model_class(config: dict[str, Any]) -> Any:
    """transformers' model class for a config.json dict: the first `architectures` entry of its family."""
    import transformers

    return getattr(transformers, family_for_hf_config(config).architectures[0])


def verbatim(task_type: str | None) -> str:
    """The task type `Processor.prompt_messages` takes: the named question template, or "{Question}" (the text as
    given) for None."""
    return "{Question}" if task_type is None else task_type


@dataclasses.dataclass
class TorchRuntime:
    """A loaded release: the transformers model on its device, our tokenizer and the processor settings."""

    model: Any
    tokenizer: Tokenizer
    cfg: Any  # the family's config
    device: str
    min_pixels: int
    max_pixels: int

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str = "auto", dtype: str | None = None) -> TorchRuntime:
        """Load `model_dir` on `device`; `dtype` ("bfloat16", "float16", "float32") defaults to float32 on the
        CPU and to the release's torch_dtype on an accelerator."""
        torch = import_torch()
        folder = Path(model_dir)
        config = json.loads((folder / CONFIG_FILE).read_text())
        device = pick_device(device)  # imports torch_npu when the NPU is used
        dtype = dtype or ("float32" if device == "cpu" else config.get("torch_dtype", "bfloat16"))
        model = hf_model_class(config).from_pretrained(folder, dtype=getattr(torch, dtype))
        cfg = family_for_hf_config(config).from_hf_config(config)
        min_pixels, max_pixels = pixel_bounds(folder, None, None, processor_of(cfg))
        return cls(
            model=model.to(device).eval(),
            tokenizer=Tokenizer.load(folder),
            cfg=cfg,
            device=device,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )

    @property
    def processor(self) -> Any:
        return processor_of(self.cfg)

    def prompt_text(self, prompt: str, num_images: int, task_type: str | None = None) -> str:
        """The rendered chat prompt (one image placeholder per image, generation prompt appended); `task_type`
        wraps the text in that question template as in training, None keeps it verbatim."""
        return self.processor.render_prompt(self.tokenizer, prompt, num_images, verbatim(task_type))

    def inputs(self, images: Sequence[ImageInput], prompt: str, task_type: str | None = None) -> dict[str, Any]:
        """The model's keyword inputs for one prompt: input_ids, attention_mask and the processor's image inputs."""
        return self.batch_inputs([(images, prompt)], task_type)

    def prompt_batch(
        self, requests: Sequence[tuple[Sequence[ImageInput], str]], task_type: str | None = None
    ) -> PromptBatch:
        """Several (images, prompt) requests as one batch of the family's processor, left-padded with the pad token
        to the longest prompt, as VLM-R1's processor pads."""
        processor = self.processor
        ids, images = [], []
        for paths, prompt in requests:
            loaded = [load_image(p) if isinstance(p, (str, os.PathLike)) else p for p in paths]
            processed = [
                processor.preprocess_image(i, min_pixels=self.min_pixels, max_pixels=self.max_pixels) for i in loaded
            ]
            ids.append(self.tokenizer.encode(self.prompt_text(prompt, len(processed), task_type)))
            images.append(processed)
        longest = max(
            len(row) - len(imgs) + sum(processor.image_tokens(g) for _, g in imgs) for row, imgs in zip(ids, images)
        )
        return processor.build_prompt_batch(ids, images, self.cfg, pad_id=self.tokenizer.pad_id, length=longest)

    def batch_inputs(
        self, requests: Sequence[tuple[Sequence[ImageInput], str]], task_type: str | None = None
    ) -> dict[str, Any]:
        """Keyword inputs of transformers' model for several (images, prompt) requests (`prompt_batch`): token ids,
        the attention mask and `Processor.hf_model_inputs`, floating arrays in the model's dtype."""
        torch = import_torch()
        batch = self.prompt_batch(requests, task_type)
        arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        arrays |= self.processor.hf_model_inputs(batch)
        tensor = lambda a: (
            torch.from_numpy(np.ascontiguousarray(a)).to(self.model.dtype)
            if np.issubdtype(a.dtype, np.floating)
            else torch.from_numpy(a.astype(np.int64))
        )
        return {k: tensor(v).to(self.device) for k, v in arrays.items()}

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
