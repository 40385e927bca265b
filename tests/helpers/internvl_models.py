"""Tiny random transformers `InternVLForConditionalGeneration` folders for the InternVL tests, and left-padded
multi-tile prompt batches in the processor's conventions (built here by hand, independent of the processor)."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tests.helpers.hf_models import redraw

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

# Untied head, LayerNorm blocks with q/k/v biases, the last hidden state; 56-pixel tiles: 4x4 patches -> 4 tokens.
TINY = {
    "architectures": ["InternVLForConditionalGeneration"],
    "model_type": "internvl",
    "image_token_id": 150,
    "image_seq_length": 4,
    "downsample_ratio": 0.5,
    "vision_feature_layer": -1,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen2",
        "vocab_size": 160,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
    "vision_config": {
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 48,
        "image_size": 56,
        "patch_size": 14,
        "attention_bias": True,
        "use_qk_norm": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
    },
}

# Tied head, RMSNorm blocks with q/k norm and no q/k/v biases, the second-to-last hidden state, other widths and GQA
# ratio; 84-pixel tiles: 6x6 patches -> 9 tokens.
TINY_B = copy.deepcopy(TINY)
TINY_B.update({"image_seq_length": 9, "vision_feature_layer": -2, "tie_word_embeddings": True})
TINY_B["text_config"].update(
    {"hidden_size": 96, "intermediate_size": 80, "num_hidden_layers": 3, "num_attention_heads": 6,
     "num_key_value_heads": 3, "tie_word_embeddings": True}
)  # fmt: skip
TINY_B["vision_config"].update(
    {"hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 3, "intermediate_size": 40, "image_size": 84,
     "attention_bias": False, "use_qk_norm": True, "norm_type": "rms_norm"}
)  # fmt: skip


def build_hf_model(config: dict, seed: int = 0):
    """transformers' model of `config` in float32, every tensor redrawn (`redraw`), layer scales around 0.5."""
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(InternVLConfig(**copy.deepcopy(config))).float()
    redraw(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition(".")[2].startswith("lambda_"):
                p.copy_(0.5 + 0.2 * torch.randn_like(p))
    return model.eval()


def save_random_internvl(out_dir: str | Path, config: dict, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    build_hf_model(config, seed).save_pretrained(out_dir)
    return out_dir


def load_hf_internvl(model_dir: str | Path):
    """transformers' model of a folder in float32 with eager attention (the reference implementation)."""
    import torch
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@dataclasses.dataclass(frozen=True)
class TilePrompts:
    """A left-padded batch: each image is <img>, tokens_per_tile <IMG_CONTEXT> per tile, </img>, amid random text."""

    input_ids: np.ndarray  # [B, L]
    attention_mask: np.ndarray  # [B, L]
    positions: np.ndarray  # [B, L]: 0.. over real tokens, 1 on pads
    gather: np.ndarray  # [B, L]: k for the k-th context token of the batch (row-major), -1 elsewhere
    pixel_values: np.ndarray  # [tiles, 3, S, S], tiles of all images in prompt order

    def positions3(self) -> np.ndarray:
        return np.broadcast_to(self.positions, (3, *self.positions.shape)).copy()


def tile_prompts(
    cfg, tiles: Sequence[Sequence[int]], seed: int = 0, extra_tiles: int = 0, length: int | None = None
) -> TilePrompts:
    """Prompt b holds one image per entry of `tiles[b]` (its tile count); `extra_tiles` zero tiles that no token
    gathers are appended (the processor's padding); `length` forces the padded length."""
    rng = np.random.default_rng(seed)
    specials = {
        cfg.image_token_id,
        cfg.image_start_token_id,
        cfg.image_end_token_id,
        cfg.eos_token_id,
        cfg.pad_token_id,
    }
    plain = np.array(sorted(set(range(cfg.text.vocab_size)) - specials))
    text = lambda n: [int(t) for t in rng.choice(plain, n)]
    rows = []
    for b, counts in enumerate(tiles):
        row = text(2 + b)
        for count in counts:
            row += [cfg.image_start_token_id] + [cfg.image_token_id] * (cfg.num_image_token * count)
            row += [cfg.image_end_token_id] + text(1 + b)
        rows.append(row)
    length = length or max(map(len, rows)) + 1
    ids = np.full((len(rows), length), cfg.pad_token_id, np.int64)
    mask = np.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :] = row
        mask[b, length - len(row) :] = 1
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
    gather = np.full(ids.shape, -1, np.int64)
    context = ids == cfg.image_token_id
    gather[context] = np.arange(context.sum())
    count = sum(map(sum, tiles))
    size = cfg.vision.image_size
    pixels = rng.standard_normal((count + extra_tiles, 3, size, size)).astype(np.float32)
    pixels[count:] = 0.0
    return TilePrompts(ids, mask, positions, gather, pixels)
