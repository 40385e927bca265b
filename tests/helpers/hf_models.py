"""Random HF Qwen2.5-VL and Qwen2-VL checkpoints for parity tests (tiny shapes, the released 3B's widths at shallow
depth), and the transformers model that reads them."""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

# Covers every code path: windowed + full blocks, padded windows, GQA, sectioned M-RoPE.
TINY_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "torch_dtype": "float32",
    "vocab_size": 160,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "max_position_embeddings": 512,
    "use_sliding_window": False,
    "sliding_window": 512,
    "max_window_layers": 2,
    "hidden_act": "silu",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "image_token_id": 150,
    "video_token_id": 151,
    "vision_start_token_id": 152,
    "vision_end_token_id": 153,
    "vision_token_id": 154,
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_heads": 2,
        "in_chans": 3,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 56,
        "fullatt_block_indexes": [1, 3],
        "tokens_per_second": 2,
        "hidden_act": "silu",
    },
}

# A second shape: other depths, head counts, GQA ratio, window layout and full-attention blocks.
TINY_CONFIG_B = copy.deepcopy(TINY_CONFIG)
TINY_CONFIG_B.update(
    {
        "hidden_size": 96,
        "intermediate_size": 80,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
        "tie_word_embeddings": True,
        "vocab_size": 200,
    }
)
TINY_CONFIG_B["vision_config"].update(
    {
        "depth": 5,
        "hidden_size": 48,
        "intermediate_size": 40,
        "num_heads": 3,
        "out_hidden_size": 96,
        "window_size": 112,
        "fullatt_block_indexes": [0, 4],
    }
)

# Qwen2-VL: TINY_CONFIG's decoder and ids, a 3-block LayerNorm / QuickGELU tower (embed 32, MLP ratio 2).
QWEN2_VL_TINY_CONFIG = {
    **{k: v for k, v in TINY_CONFIG.items() if k != "vision_config"},
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "vision_config": {
        "depth": 3,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 2,
        "in_chans": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "hidden_act": "quick_gelu",
    },
}

# A held-out Qwen2-VL shape for `vlmr1 check-parity`: other depths, widths, heads, GQA ratio, rope sections, tied.
QWEN2_VL_TINY_CONFIG_B = copy.deepcopy(QWEN2_VL_TINY_CONFIG)
QWEN2_VL_TINY_CONFIG_B.update(
    {
        "hidden_size": 96,
        "intermediate_size": 80,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
        "tie_word_embeddings": True,
    }
)
QWEN2_VL_TINY_CONFIG_B["vision_config"].update(
    {"depth": 2, "embed_dim": 48, "hidden_size": 96, "num_heads": 3, "mlp_ratio": 3}
)

# The released Qwen2.5-VL-3B-Instruct config.json with only 2 text and 4 vision layers: every width, the vocabulary,
# the tied head and the 112-pixel windows are real, so activations and logits have realistic scales. Full attention
# on blocks 1 and 3 (the release's [7, 15, 23, 31] would leave 4 blocks all windowed).
WIDTH_3B_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "torch_dtype": "float32",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "max_position_embeddings": 128000,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 70,
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "tie_word_embeddings": True,
    "vision_config": {
        "depth": 4,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1, 3],
        "tokens_per_second": 2,
        "hidden_act": "silu",
    },
}


def hf_model(config: dict):
    """transformers' model of a config.json dict (the class its `architectures` names), randomly initialised."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config)
    return getattr(transformers, config["architectures"][0])(hf_config)


def save_random_hf_model(
    out_dir: str | Path, config: dict, seed: int = 0, tied: bool | None = None, std: float | None = 0.05
) -> Path:
    """Build the model `config` names (e.g. `Qwen2_5_VLForConditionalGeneration`) and save_pretrained it.

    With `std`, every tensor is redrawn (`redraw`); with `std=None` the model keeps transformers' own
    initialisation.
    """
    import torch

    config = copy.deepcopy(config)
    if tied is not None:
        config["tie_word_embeddings"] = tied
    torch.manual_seed(seed)
    model = hf_model(config).float()
    if std is not None:
        redraw(model, std)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def redraw(module, std: float = 0.05) -> None:
    """Redraw every parameter of a torch module in place from torch's global generator: norm scales 1 + N(0, 0.2),
    everything else N(0, std), biases plus a shared offset (HF's zero biases and unit norms would hide bugs)."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.rpartition(".")[2] == "weight":  # the only 1-D weights are norm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p) + (0.4 * std * torch.randn(()) if p.ndim == 1 else 0.0))


def load_hf(model_dir: str | Path):
    """transformers' model of a folder (its family's class) in float32 with eager attention (the reference)."""
    import json

    import torch

    from ports.torch_runtime import hf_model_class

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return hf_model_class(config).from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def tiny_model_with_qwen_ids():
    """Our tiny architecture with the vendored Qwen2.5 tokenizer's vocabulary size and special ids, so a release of
    it passes export validation with the default tokenizer files."""
    from flax import nnx

    from vlmr1_jax.models.qwen2_5_vl.config import Qwen25VLConfig, get_preset, with_overrides
    from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL

    qwen = Qwen25VLConfig()
    ids = (
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
        "vision_token_id",
        "bos_token_id",
        "eos_token_id",
    )
    cfg = with_overrides(get_preset("tiny"), {"text.vocab_size": 151680, **{k: getattr(qwen, k) for k in ids}})
    return Qwen25VL(cfg, rngs=nnx.Rngs(0))
