"""What every benchmark shares: the named workloads (`tiny`, `small`, `demo`), one random model and tokenizer per
workload written as an HF folder (so transformers and TRL load the very weights and tokenizer we run), the prompts
and images, median timing after warm-up, the decode floor, and the one-JSON-line result record.

Nothing is downloaded: the tokenizer is a compact BPE trained on the synthetic task's strings, the model is random.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # a stray torch-npu must not break `import torch`

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
QUESTION = "{Question}"  # the prompt is the bare question after the image (VLM-R1's chat turn, no instruction)


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark setting: the model (a preset plus overrides), the prompts and the GRPO step around them."""

    name: str
    preset: str
    overrides: dict[str, Any]
    prompts: int  # P prompts, each one image then `text_tokens` tokens of question
    image_size: int  # square images, pixels (a multiple of 28: 224 -> 64 merged image tokens)
    text_tokens: int
    generations: int  # G
    new_tokens: int  # exactly this many per completion (EOS never ends a sample early)
    temperature: float = 1.0
    top_k: int = 50
    beta: float = 0.04
    learning_rate: float = 1e-6


WORKLOADS = {
    # Every code path, in seconds.
    "tiny": Workload("tiny", "tiny", {}, prompts=2, image_size=56, text_tokens=16, generations=4, new_tokens=16),
    # 37.7M parameters: text 512 x 8 layers (8 / 2 heads, MLP 1376, untied), vocab 8192, vision 8 x 256.
    "small": Workload(
        "small",
        "tiny",
        {
            "text.vocab_size": 8192,
            "text.hidden_size": 512,
            "text.intermediate_size": 1376,
            "text.num_hidden_layers": 8,
            "text.num_attention_heads": 8,
            "text.num_key_value_heads": 2,
            "text.mrope_section": (8, 12, 12),
            "text.max_position_embeddings": 2048,
            "vision.depth": 8,
            "vision.hidden_size": 256,
            "vision.intermediate_size": 512,
            "vision.num_heads": 4,
            "vision.out_hidden_size": 512,
            "vision.window_size": 112,
            "vision.fullatt_block_indexes": (3, 7),
        },
        prompts=2,
        image_size=224,
        text_tokens=32,
        generations=8,
        new_tokens=64,
    ),
    # `make demo`'s GRPO phase: demo-s, 8 prompts of one 112x112 image, G=8, 36 new tokens.
    "demo": Workload("demo", "demo-s", {}, prompts=8, image_size=112, text_tokens=24, generations=8, new_tokens=36),
}


def workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise SystemExit(f"unknown --config {name!r}; choose one of {sorted(WORKLOADS)}") from None


def corpus() -> list[str]:
    """What the compact tokenizer is trained on: the synthetic REC task's strings."""
    from vlmr1_jax.data.synthetic import corpus_strings

    return corpus_strings()


@dataclasses.dataclass
class Setup:
    """A workload made concrete: the HF folder (weights, config, tokenizer, processor), our model of the same
    weights, and the P prompts (question texts and PIL images, written as files too for the trainer)."""

    work: Workload
    folder: Path
    model: Any  # our Qwen25VL
    tokenizer: Any  # our Tokenizer
    questions: list[str]
    images: list[Image.Image]
    image_paths: list[str]

    @property
    def parameters(self) -> int:
        import jax
        from flax import nnx

        return sum(x.size for x in jax.tree.leaves(nnx.state(self.model, nnx.Param)))


def build_setup(work: Workload, folder: Path, seed: int = 0) -> Setup:
    """Tokenizer, random model and prompts of `work`, written into `folder` as an HF checkpoint transformers reads."""
    from flax import nnx

    from converters.hf import save_hf_safetensors
    from vlmr1_jax.models.family import get_family
    from vlmr1_jax.models.qwen2_5_vl.config import get_preset, to_hf_config, with_overrides
    from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL
    from vlmr1_jax.processing.tokenizer import build_compact_tokenizer
    from vlmr1_jax.train.setup import tokenizer_token_ids

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_compact_tokenizer(corpus(), vocab_size=512)
    ids = tokenizer_token_ids(tokenizer, get_family("qwen2_5_vl").processor)
    vocab = max(work.overrides.get("text.vocab_size", 0), 512)
    cfg = with_overrides(get_preset(work.preset), {**work.overrides, "text.vocab_size": vocab, **ids})
    model = Qwen25VL(cfg, rngs=nnx.Rngs(seed))
    (folder / "config.json").write_text(json.dumps(to_hf_config(cfg, "float32")))
    save_hf_safetensors(nnx.state(model), cfg, folder / "model.safetensors")
    tokenizer.save(folder)

    rng = np.random.default_rng(seed)
    words = " ".join(corpus()).split()
    questions, images, paths = [], [], []
    for p in range(work.prompts):
        text: list[str] = []
        while len(tokenizer.encode(" ".join(text))) < work.text_tokens:
            text.append(str(rng.choice(words)))
        while len(tokenizer.encode(" ".join(text))) > work.text_tokens:  # a long last word: trim to the count
            text[-1] = text[-1][:-1] or text.pop()
        questions.append(" ".join(text))
        pixels = rng.integers(0, 256, (work.image_size, work.image_size, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels))
        paths.append(str(folder / f"image_{p}.png"))
        images[-1].save(paths[-1])
    return Setup(work, folder, model, tokenizer, questions, images, paths)


def hf_processor(setup: Setup):
    """transformers' Qwen2.5-VL processor over the workload's tokenizer (what TRL prepares prompts with), images only:
    its PIL image processor needs no torchvision, and its pixel bounds keep the images at their size, as ours do."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    class ImageProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL's processor without its video processor (which needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    pixels = setup.work.image_size**2
    return ImageProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels),
        tokenizer=AutoTokenizer.from_pretrained(setup.folder),
        chat_template=setup.tokenizer.chat_template,
    )


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `fn` over `repeats` calls after `warmup` untimed ones (compilation, caches)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def environment() -> dict[str, Any]:
    """When and where: date, machine, core count, load average, library versions."""
    versions = {}
    for package in ("jax", "jaxlib", "flax", "torch", "transformers", "trl", "peft", "accelerate"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{cpu}, {os.cpu_count()} cores",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch_threads(),
        "versions": versions,
    }


def record(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """Print `result` (with the environment) as one JSON line and append it to benchmarks/results/<name>.jsonl."""
    line = {"benchmark": name, **environment(), **result}
    text = json.dumps(line, sort_keys=False)
    print(text, flush=True)
    RESULTS.mkdir(exist_ok=True)
    with (RESULTS / f"{name}.jsonl").open("a") as f:
        f.write(text + "\n")
    return line


def torch_threads() -> int:
    """torch's threads: every core, as JAX's CPU backend uses them, or $BENCH_TORCH_THREADS (on a loaded machine
    torch's thread barriers wait on descheduled threads, and one thread can be faster)."""
    return int(os.environ.get("BENCH_TORCH_THREADS") or os.cpu_count() or 1)


def set_torch_threads() -> None:
    """Give torch `torch_threads()` threads (the limits and the baselines run with the same count)."""
    import torch

    torch.set_num_threads(torch_threads())


def prompt_batch(setup: Setup, length: int | None = None):
    """The P prompts as the trainer encodes them (VLM-R1's chat turn: image, then the question): (batch, images),
    `images` the processed (patch rows, grid) of each prompt."""
    from vlmr1_jax.models.family import family_of
    from vlmr1_jax.processing.batch import EncodedPrompt, build_prompt_batch, encode_prompt_text, load_prompt_images

    cfg = setup.model.cfg
    processor = family_of(cfg).processor
    pixels = setup.work.image_size**2
    encoded = [
        EncodedPrompt(
            encode_prompt_text(q, 1, setup.tokenizer, cfg, QUESTION),
            load_prompt_images([path], processor, min_pixels=pixels, max_pixels=pixels),
        )
        for q, path in zip(setup.questions, setup.image_paths)
    ]
    batch = build_prompt_batch(encoded, cfg, pad_id=setup.tokenizer.pad_id, length=length)
    return batch, [e.images for e in encoded]


def decode_floor(setup: Setup, rows: int, context: int, limits: dict[str, float]) -> dict[str, float]:
    """The fastest one decode step of `rows` rows could be on this machine: the larger of (bytes read / measured
    bandwidth) and (FLOPs / measured fp32 peak). Bytes: the text weights a step multiplies by (every decoder matrix
    and the LM head, not the embedding rows it gathers) plus the KV cache at `context` positions; FLOPs: 2 per
    weight per row."""
    import jax
    from flax import nnx

    cfg = setup.model.cfg.text
    text = nnx.state(setup.model.text, nnx.Param)
    weights = sum(x.size for x in jax.tree.leaves(text))
    gathered = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size  # tied: the head reads it whole
    read_weights = weights - gathered
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = rows * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * context
    bytes_read = 4 * (read_weights + cache)
    flops = 2 * rows * read_weights
    memory_s = bytes_read / (limits["read_gb_per_s"] * 1e9)
    compute_s = flops / (limits["fp32_matmul_gflops"] * 1e9)
    return {
        "floor_ms": round(1e3 * max(memory_s, compute_s), 3),
        "floor_bytes_mb": round(bytes_read / 1e6, 1),
        "floor_gflop": round(flops / 1e9, 3),
    }
