"""Qwen2-VL configuration: the Qwen2.5-VL decoder and special ids with Qwen2-VL's vision tower, presets, and the HF
`config.json` mapping (both directions) as transformers' `Qwen2VLConfig` reads it.

Qwen2-VL's vision section differs from Qwen2.5-VL's: its width is `embed_dim` (the section's `hidden_size` is the
text width the merger projects to), the MLP width is `embed_dim * mlp_ratio`, every block attends within the whole
frame (no windows), and the activation is QuickGELU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlmr1_jax.models.qwen2_5_vl.config import (
    Qwen25VLConfig,
    TextConfig,
    _rope_theta,
    check_model_type,
    text_from_hf_config,
    text_to_hf_config,
    with_overrides as _with_overrides,
)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280  # HF vision_config.embed_dim
    num_heads: int = 16
    mlp_ratio: int = 4
    out_hidden_size: int = 1536  # HF vision_config.hidden_size: the text width
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return self.hidden_size * self.mlp_ratio

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel row: C * Tp * p * p (1176 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def fullatt_block_indexes(self) -> tuple[int, ...]:
        """Every block attends within the whole frame."""
        return tuple(range(self.depth))

    @property
    def window_merged(self) -> int:
        """Side, in merged units, of the slot groups the host lays patches out in (models/qwen2_5_vl/vision_plan.py);
        no block attends by window, so this only sets the padding granularity."""
        return 2

    @property
    def window_patches(self) -> int:
        return self.window_merged**2 * self.merge_unit


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig(Qwen25VLConfig):
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)  # type: ignore[assignment]
    family: str = "qwen2_vl"


def _preset(text: dict[str, Any], vocab: int, tied: bool) -> Qwen2VLConfig:
    t = TextConfig(vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=32768, **text)
    return Qwen2VLConfig(text=t, vision=VisionConfig(out_hidden_size=t.hidden_size)).validate()  # type: ignore[return-value]


# Released sizes (Qwen2-VL-2B-Instruct, Qwen2-VL-7B-Instruct); both share the 675M-parameter vision tower.
PRESETS: dict[str, Qwen2VLConfig] = {
    "qwen2-vl-2b": _preset(
        dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
        ),
        151936,
        True,
    ),
    "qwen2-vl-7b": _preset(
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
        ),
        152064,
        False,
    ),
    # Covers every code path in milliseconds (the Qwen2.5-VL tiny decoder and ids).
    "tiny": Qwen2VLConfig(
        text=TextConfig(
            vocab_size=160,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=(2, 3, 3),
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
        vision=VisionConfig(depth=3, hidden_size=32, num_heads=2, mlp_ratio=2, out_hidden_size=64),
        image_token_id=150,
        video_token_id=151,
        vision_start_token_id=152,
        vision_end_token_id=153,
        vision_token_id=154,
        bos_token_id=0,
        eos_token_id=1,
    ).validate(),  # type: ignore[dict-item]
    # `vlmr1 demo --family qwen2_vl`: Qwen2.5-VL's demo-s decoder with a Qwen2-VL tower of its widths (ids and
    # vocabulary come from the demo's tokenizer).
    "demo-s": Qwen2VLConfig(
        text=TextConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=(4, 6, 6),
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        ),
        vision=VisionConfig(depth=2, hidden_size=64, num_heads=4, mlp_ratio=4, out_hidden_size=128),
    ).validate(check_token_ids=False),  # type: ignore[dict-item]
}
ALIASES = {"2b": "qwen2-vl-2b", "7b": "qwen2-vl-7b"}


def get_preset(name: str) -> Qwen2VLConfig:
    """A preset by name or short alias ("2b" = "qwen2-vl-2b")."""
    try:
        return PRESETS[ALIASES.get(str(name).lower(), name)]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}, aliases {sorted(ALIASES)}") from None


def with_overrides(cfg: Qwen2VLConfig, overrides: dict[str, Any]) -> Qwen2VLConfig:
    """Replace fields by dotted name, e.g. {"text.vocab_size": 512, "vision.depth": 4}, validated."""
    return _with_overrides(cfg, overrides)  # type: ignore[return-value]


# What a key missing from vision_config means to transformers' Qwen2VLVisionConfig.
HF_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 32,
    "embed_dim": 1280,
    "hidden_size": 3584,
    "hidden_act": "quick_gelu",
    "mlp_ratio": 4,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "rope_theta": 10000.0,
}


def from_hf_config(cfg: dict[str, Any]) -> Qwen2VLConfig:
    """Our config of a Qwen2-VL `config.json` dict (flat hub layout or transformers 5.x's nested one), missing keys
    taking transformers' defaults; validated."""
    check_model_type(cfg, "qwen2_vl")
    text, ids = text_from_hf_config(cfg)
    raw = cfg.get("vision_config") or {}
    vc = {**HF_VISION_DEFAULTS, **raw}
    vision = VisionConfig(
        depth=vc["depth"],
        hidden_size=vc["embed_dim"],
        num_heads=vc["num_heads"],
        mlp_ratio=vc["mlp_ratio"],
        out_hidden_size=vc["hidden_size"],
        patch_size=vc["patch_size"],
        temporal_patch_size=vc["temporal_patch_size"],
        spatial_merge_size=vc["spatial_merge_size"],
        in_channels=raw.get("in_channels", raw.get("in_chans", vc["in_channels"])),
        hidden_act=vc["hidden_act"],
        rope_theta=_rope_theta(raw, HF_VISION_DEFAULTS["rope_theta"]),
    )
    return Qwen2VLConfig(text=text, vision=vision, **ids).validate()  # type: ignore[return-value]


def to_hf_config(cfg: Qwen2VLConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """The flat, hub-style `config.json` of the Qwen2-VL releases, which transformers and vLLM read."""
    v = cfg.vision
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        **text_to_hf_config(cfg, torch_dtype),
        "vision_config": {
            "depth": v.depth,
            "embed_dim": v.hidden_size,
            "hidden_size": v.out_hidden_size,
            "hidden_act": v.hidden_act,
            "mlp_ratio": v.mlp_ratio,
            "num_heads": v.num_heads,
            "in_chans": v.in_channels,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "spatial_patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
        },
    }
