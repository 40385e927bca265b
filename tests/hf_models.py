"""Tiny random HF Qwen2.5-VL checkpoints for parity tests (every parameter randomised: HF zero-inits biases)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

# QWEN25VL-PORT.md 1.3: covers every code path (windowed + full blocks, padded windows, GQA, sectioned M-RoPE).
TINY_CONFIG = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "torch_dtype": "float32",
    "vocab_size": 160, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "max_position_embeddings": 512,
    "use_sliding_window": False, "sliding_window": 512, "max_window_layers": 2, "hidden_act": "silu",
    "bos_token_id": 0, "eos_token_id": 1, "image_token_id": 150, "video_token_id": 151,
    "vision_start_token_id": 152, "vision_end_token_id": 153, "vision_token_id": 154, "tie_word_embeddings": False,
    "vision_config": {"depth": 4, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "in_chans": 3,
                      "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 56, "fullatt_block_indexes": [1, 3], "tokens_per_second": 2,
                      "hidden_act": "silu"},
}

# A second shape: other depths, head counts, GQA ratio, window layout and full-attention blocks.
TINY_CONFIG_B = copy.deepcopy(TINY_CONFIG)
TINY_CONFIG_B.update({"hidden_size": 96, "intermediate_size": 80, "num_hidden_layers": 3, "num_attention_heads": 6,
                      "num_key_value_heads": 3, "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
                      "tie_word_embeddings": True, "vocab_size": 200})
TINY_CONFIG_B["vision_config"].update({"depth": 5, "hidden_size": 48, "intermediate_size": 40, "num_heads": 3,
                                       "out_hidden_size": 96, "window_size": 112, "fullatt_block_indexes": [0, 4]})


def save_random_hf_model(out_dir: str | Path, config: dict, seed: int = 0, tied: bool | None = None) -> Path:
    """Build `Qwen2_5_VLForConditionalGeneration` from `config`, randomise every tensor, save_pretrained."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = copy.deepcopy(config)
    if tied is not None:
        config["tie_word_embeddings"] = tied
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p) + (0.02 * torch.randn(()) if p.ndim == 1 else 0.0))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir
