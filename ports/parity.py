"""`vlmr1 check-parity`: run an HF folder of any model family through transformers and through our JAX port.

Both sides get the same prompt batch: the family's processor builds it (VLM-R1's prompt through the folder's
tokenizer and chat template, random-noise images of the given sizes), our model reads its arrays and transformers'
model (the class the config's `architectures` names) reads `input_ids`, `attention_mask` and the processor's
`hf_model_inputs`, and computes the prompt's positions itself, so ours are checked too (decode steps get our next
position: transformers derives them only inside `generate`). Compared: the visual tokens as they
enter the decoder, prompt logits on valid tokens, and each cached decode step's logits; transformers runs in float32,
our side in float32 (or --dtype bfloat16).

Each compared tensor passes when max|ours - ref| <= atol + rtol * max|ref|: the tolerance scales with the
tensor's magnitude (vision activations of real checkpoints reach the thousands, logits tens). float32 ports agree
to a relative 1e-6..1e-5; a real bug (a wrong rope section, a missing bias, a perturbed weight) shows at 1e-3..1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # a stray torch-npu must not break `import torch`

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmr1_jax.extras import require_torch_extra
from vlmr1_jax.filenames import CONFIG_FILE
from vlmr1_jax.models.family import family_for_hf_config, processor_of
from vlmr1_jax.models.hf_weights import load_hf_model, read_config
from vlmr1_jax.models.processor import PromptBatch
from vlmr1_jax.processing.tokenizer import Tokenizer

RTOL = 1e-4  # 10-100x above float32 rounding at real widths, 10x below the smallest bug in tests/test_parity.py
ATOL = 1e-6  # only matters for a reference that is (nearly) all zeros
WORDS = ("red", "circle", "left", "of", "the", "box", "a", "small", "blue", "square", "near", "top")


@dataclasses.dataclass
class ParityInputs:
    """One left-padded multimodal prompt batch as each side takes it."""

    batch: PromptBatch  # our side: the family processor's arrays
    hf_inputs: dict[str, np.ndarray]  # transformers' keyword arrays besides input_ids / attention_mask
    decode_tokens: np.ndarray  # [B, steps] tokens fed during the cached decode steps
    # Position ids handed to transformers (with a leading axis per rope section, e.g. [3, B, L]); None: transformers
    # computes its own from `hf_inputs`, which checks ours. Set only where transformers departs from the reference.
    position_ids: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Diff:
    """One compared tensor: the largest absolute difference and the reference's scale max|ref|."""

    name: str
    max_diff: float
    scale: float

    @property
    def relative(self) -> float:
        return self.max_diff / self.scale if self.scale else (0.0 if self.max_diff == 0 else math.inf)

    def passed(self, rtol: float = RTOL, atol: float = ATOL) -> bool:
        return self.max_diff <= atol + rtol * self.scale

    def line(self, rtol: float = RTOL, atol: float = ATOL) -> str:
        verdict = "ok" if self.passed(rtol, atol) else "FAIL"
        return (
            f"{self.name:<16} max|diff| {self.max_diff:.3e}  max|ref| {self.scale:.3e}  "
            f"relative {self.relative:.2e}  limit {atol + rtol * self.scale:.3e}  {verdict}"
        )

    @classmethod
    def of(cls, name: str, ours: np.ndarray, ref: np.ndarray) -> Diff:
        if ours.shape != ref.shape:
            raise ValueError(f"{name}: our shape {ours.shape} != reference shape {ref.shape}")
        diff = np.abs(ours - ref)  # NaN anywhere makes max_diff NaN, which fails every rule
        return cls(name, float(diff.max(initial=0.0)), float(np.abs(ref).max(initial=0.0)))


@dataclasses.dataclass
class ParityReport:
    """Per-tensor differences of one parity run; passes when every compared tensor does."""

    vision: Diff | None  # None without images or videos
    logits: Diff
    decode: list[Diff]

    @property
    def diffs(self) -> list[Diff]:
        return [d for d in (self.vision, self.logits, *self.decode) if d is not None]

    def passed(self, rtol: float = RTOL, atol: float = ATOL) -> bool:
        return all(d.passed(rtol, atol) for d in self.diffs)

    @property
    def worst_relative(self) -> float:
        return max(d.relative for d in self.diffs)


Outputs = tuple[np.ndarray, np.ndarray, list[np.ndarray]]  # (visual tokens, prompt logits, decode-step logits)


def load_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
    """The folder's tokenizer, which the parity prompts are built with (errors say so)."""
    try:
        return Tokenizer.load(model_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"check-parity renders its prompts with the model folder's tokenizer: {e}") from e


def make_inputs(
    model_dir: str | os.PathLike,
    image_sizes: Sequence[tuple[int, int]],
    *,
    batch: int = 2,
    steps: int = 4,
    seed: int = 0,
    min_pixels: int = 3136,
    max_pixels: int = 12845056,
) -> ParityInputs:
    """VLM-R1 prompts of random words (row b has b more), images of `image_sizes` (height, width) of random noise
    dealt to the rows round-robin, through the folder's tokenizer and its family's processor; shorter rows are
    left-padded. Decode steps feed random tokens of the same words."""
    cfg = read_config(model_dir)
    processor = processor_of(cfg)
    tokenizer = load_tokenizer(model_dir)
    rng = np.random.default_rng(seed)
    noise = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    images: list[list[Any]] = [[] for _ in range(batch)]
    for i, (h, w) in enumerate(image_sizes):
        images[i % batch].append(processor.preprocess_image(noise(h, w), min_pixels=min_pixels, max_pixels=max_pixels))
    words = lambda n: " ".join(rng.choice(WORDS, n))
    ids = [
        tokenizer.encode(processor.render_prompt(tokenizer, words(3 + b), len(images[b]), "{Question}"))
        for b in range(batch)
    ]
    prompt = processor.build_prompt_batch(ids, images, cfg, pad_id=tokenizer.pad_id)
    plain = np.asarray(tokenizer.encode(" " + words(8)))
    return ParityInputs(prompt, processor.hf_model_inputs(prompt), rng.choice(plain, (batch, steps)))


def run_jax(model_dir: str, inputs: ParityInputs, dtype: jnp.dtype = jnp.float32) -> Outputs:
    """Our side, computing in `dtype` (float32 parameters): (visual tokens in placeholder order, prompt logits,
    decode-step logits), all as float32."""
    model = load_hf_model(model_dir, dtype=dtype)
    b = inputs.batch
    # Parameters go in as arguments: closed over, XLA would fold them as constants (>20 GB at the 3B's widths).
    graphdef, state = nnx.split(model)
    feats = None
    if b.vision:
        feats = jax.jit(lambda state, kw: nnx.merge(graphdef, state).encode_vision(kw))(
            state, {k: jnp.asarray(v) for k, v in b.vision.items()}
        )
    rows, length = b.input_ids.shape
    steps = inputs.decode_tokens.shape[1]
    cache = model.init_cache(rows, length + steps)

    @jax.jit
    def step(state, ids, pos, mask, gather, feats, cache):
        model = nnx.merge(graphdef, state)
        hidden, cache = model(ids, pos, mask, feats, gather, cache)
        return model.logits(hidden), cache

    logits, cache = step(
        state, *(jnp.asarray(x) for x in (b.input_ids, b.positions, b.attention_mask, b.vision_gather)), feats, cache
    )
    decode = []
    for s in range(steps):
        pos = np.broadcast_to((b.next_position + s)[None, :, None], (b.positions.shape[0], rows, 1))
        out, cache = step(
            state,
            jnp.asarray(inputs.decode_tokens[:, s : s + 1]),
            jnp.asarray(pos),
            jnp.ones((rows, 1), jnp.int32),
            jnp.full((rows, 1), -1, jnp.int32),
            feats,
            cache,
        )
        decode.append(np.asarray(out[:, 0], np.float32))
    gather = b.vision_gather[b.vision_gather >= 0]  # row-major over (row, token): the order transformers fills
    vision = np.asarray(feats, np.float32)[gather] if feats is not None else np.zeros((0, 0), np.float32)
    return vision, np.asarray(logits, np.float32), decode


def hf_model_class(model_dir: str | os.PathLike) -> Any:
    """transformers' class for the folder: the first `architectures` entry of its family."""
    import transformers

    raw = json.loads((Path(model_dir) / CONFIG_FILE).read_text())
    return getattr(transformers, family_for_hf_config(raw).architectures[0])


def run_hf(model_dir: str, inputs: ParityInputs) -> Outputs:
    """transformers' side, in float32 eager attention; the visual tokens are read where the decoder receives them."""
    require_torch_extra("check-parity")
    import torch

    model = hf_model_class(model_dir).from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model = model.eval()
    b = inputs.batch
    t = torch.from_numpy
    embeds: list[Any] = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda _m, _args, kwargs: embeds.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True
    )
    explicit = inputs.position_ids

    def decode_positions(step: int) -> Any:
        """Position ids of decode step `step`: our next position per row (a text token's, equal on every rope
        axis), shaped like `explicit` when given, else [B, 1]. transformers needs them: without, a forward on a
        cache derives them from the whole attention mask, for every cached token."""
        lead = () if explicit is None else explicit.shape[:-2]
        pos = np.broadcast_to((b.next_position + step)[:, None], (*lead, len(b.next_position), 1))
        return t(np.ascontiguousarray(pos, np.int64))

    try:
        with torch.no_grad():
            mask = t(b.attention_mask.astype(np.int64))
            out = model(
                input_ids=t(b.input_ids.astype(np.int64)),
                attention_mask=mask,
                use_cache=True,
                **({} if explicit is None else {"position_ids": t(explicit.astype(np.int64))}),
                **{k: t(np.ascontiguousarray(v)) for k, v in inputs.hf_inputs.items()},
            )
            logits, past = out.logits.float().numpy(), out.past_key_values
            decode = []
            for s in range(inputs.decode_tokens.shape[1]):
                mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
                out = model(
                    input_ids=t(inputs.decode_tokens[:, s : s + 1].astype(np.int64)),
                    attention_mask=mask,
                    past_key_values=past,
                    use_cache=True,
                    position_ids=decode_positions(s),
                )
                past = out.past_key_values
                decode.append(out.logits[:, -1].float().numpy())
    finally:
        hook.remove()
    placeholders = b.vision_gather >= 0
    vision = embeds[0][t(placeholders)].float().numpy() if placeholders.any() else np.zeros((0, 0), np.float32)
    return vision, logits, decode


def compare(model_dir: str, inputs: ParityInputs, dtype: jnp.dtype = jnp.float32) -> ParityReport:
    """Run our side (computing in `dtype`) and transformers' (float32) on `inputs` and compare them."""
    return diff_report(inputs, run_jax(model_dir, inputs, dtype), run_hf(model_dir, inputs))


def diff_report(inputs: ParityInputs, ours: Outputs, ref: Outputs) -> ParityReport:
    """Differences of each compared tensor; prompt logits on valid (non-pad) positions only."""
    (ours_v, ours_l, ours_d), (hf_v, hf_l, hf_d) = ours, ref
    valid = inputs.batch.attention_mask.astype(bool)  # pad query rows are garbage on both sides
    return ParityReport(
        vision=Diff.of("vision features", ours_v, hf_v) if hf_v.size else None,
        logits=Diff.of("prompt logits", ours_l[valid], hf_l[valid]),
        decode=[Diff.of(f"decode step {i}", a, b) for i, (a, b) in enumerate(zip(ours_d, hf_d))],
    )
