"""Qwen2.5-VL architecture configuration: presets and the HF `config.json` mapping (both directions).

The released hub layout is flat (text fields at the top level, `rope_scaling.mrope_section`); transformers 5.x
writes a nested `text_config` instead. We read both, a missing key meaning what it means to transformers, and always
write the flat one.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any

# Special token ids of a finalised config: each must index the text vocabulary (an id outside it would embed as
# NaN: jnp.take fills out-of-range rows; transformers raises).
TOKEN_ID_FIELDS = (
    "image_token_id",
    "video_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    "vision_token_id",
    "bos_token_id",
    "eos_token_id",
)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 2048
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2.0
    in_channels: int = 3
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel row: C * Tp * p * p (1176 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_merged(self) -> int:
        """Window side in merged units (4 for the released 112-pixel windows)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_patches(self) -> int:
        """Patches in one full window (64 for the released models)."""
        return self.window_merged**2 * self.merge_unit


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    family: str = "qwen2_5_vl"  # the `ModelFamily` this config belongs to (a variant may reuse the class)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Qwen25VLConfig:
        """Inverse of `dataclasses.asdict` (lists back to tuples), e.g. for checkpoint metadata."""

        def tuples(d: dict[str, Any]) -> dict[str, Any]:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

        # Each section's class is its field's default factory, so a variant family's subclass reads its own.
        sections: dict[str, Callable[..., Any]] = {
            f.name: f.default_factory  # type: ignore[misc]
            for f in dataclasses.fields(cls)
            if f.name in ("text", "vision")
        }
        rest = {k: v for k, v in data.items() if k not in sections}
        return cls(**{k: make(**tuples(data[k])) for k, make in sections.items()}, **rest).validate()

    def validate(self, check_token_ids: bool = True) -> Qwen25VLConfig:
        """Raise ValueError naming the field on an inconsistent config; `check_token_ids=False` only for presets
        whose ids and vocabulary come from a tokenizer later (`with_overrides`)."""
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(f"text hidden_size {t.hidden_size} not divisible by heads {t.num_attention_heads}")
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            raise ValueError("vision head_dim must be a multiple of 4 (2-D rotary)")
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
        # Indexes >= depth are allowed: transformers' own default [7, 15, 23, 31] at a smaller depth means that
        # those blocks do not exist, i.e. fewer (or no) full-attention blocks.
        if not all(isinstance(i, numbers.Integral) for i in v.fullatt_block_indexes):
            raise ValueError(f"vision fullatt_block_indexes {v.fullatt_block_indexes} must be block numbers (ints)")
        if check_token_ids:
            for name in TOKEN_ID_FIELDS:
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < t.vocab_size:  # type: ignore[operator]
                    raise ValueError(
                        f"{name} {value!r} is not a token id of the {t.vocab_size}-token vocabulary "
                        f"(text vocab_size): set {name} to the tokenizer's id, below {t.vocab_size}"
                    )
        return self


def _preset(text: dict[str, Any], vision_intermediate: int, vocab: int, tied: bool) -> Qwen25VLConfig:
    t = TextConfig(vocab_size=vocab, tie_word_embeddings=tied, **text)
    v = VisionConfig(intermediate_size=vision_intermediate, out_hidden_size=t.hidden_size)
    return Qwen25VLConfig(text=t, vision=v).validate()


# Released sizes. The 32B vision intermediate (3456) follows the 72B release.
PRESETS: dict[str, Qwen25VLConfig] = {
    "qwen2.5-vl-3b": _preset(
        dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
        ),
        3420,
        151936,
        True,
    ),
    "qwen2.5-vl-7b": _preset(
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
        ),
        3420,
        152064,
        False,
    ),
    "qwen2.5-vl-32b": _preset(
        dict(
            hidden_size=5120,
            intermediate_size=27648,
            num_hidden_layers=64,
            num_attention_heads=40,
            num_key_value_heads=8,
        ),
        3456,
        152064,
        False,
    ),
    "qwen2.5-vl-72b": _preset(
        dict(
            hidden_size=8192,
            intermediate_size=29568,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
        ),
        3456,
        152064,
        False,
    ),
    # Covers every code path in milliseconds.
    "tiny": Qwen25VLConfig(
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
        vision=VisionConfig(
            depth=4,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            out_hidden_size=64,
            window_size=56,
            fullatt_block_indexes=(1, 3),
        ),
        image_token_id=150,
        video_token_id=151,
        vision_start_token_id=152,
        vision_end_token_id=153,
        vision_token_id=154,
        bos_token_id=0,
        eos_token_id=1,
    ).validate(),
    # Learns synthetic REC on 2 CPU cores in minutes; its vocabulary and special ids come from the demo tokenizer
    # (train/setup.py preset_config), so they are checked there, not here.
    "demo-s": Qwen25VLConfig(
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
        vision=VisionConfig(
            depth=2,
            hidden_size=64,
            intermediate_size=256,
            num_heads=4,
            out_hidden_size=128,
            window_size=56,
            fullatt_block_indexes=(1,),
        ),
    ).validate(check_token_ids=False),
}
ALIASES = {"3b": "qwen2.5-vl-3b", "7b": "qwen2.5-vl-7b", "32b": "qwen2.5-vl-32b", "72b": "qwen2.5-vl-72b"}


def get_preset(name: str) -> Qwen25VLConfig:
    """A preset by name or short alias ("3b" = "qwen2.5-vl-3b")."""
    try:
        return PRESETS[ALIASES.get(str(name).lower(), name)]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}, aliases {sorted(ALIASES)}") from None


def with_overrides(cfg: Qwen25VLConfig, overrides: dict[str, Any]) -> Qwen25VLConfig:
    """Replace fields by dotted name, e.g. {"text.vocab_size": 512, "image_token_id": 300}."""
    sections: dict[str, dict[str, Any]] = {"text": {}, "vision": {}, "": {}}
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        if section not in sections:
            raise KeyError(f"model override {key!r}: section must be text, vision or none")
        target = getattr(cfg, section) if section else cfg
        if name not in {f.name for f in dataclasses.fields(target)}:
            raise KeyError(f"model override {key!r}: unknown field {name!r}")
        sections[section][name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(
        cfg,
        text=dataclasses.replace(cfg.text, **sections["text"]),
        vision=dataclasses.replace(cfg.vision, **sections["vision"]),
        **sections[""],
    ).validate()


# What a key missing from config.json means to transformers (Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig and
# Qwen2_5_VLConfig defaults; mrope_section from the text rotary embedding). vision_token_id is no transformers field:
# the released value. These are not our presets' values: HF's defaults describe a 72B text model and a vision tower
# with hidden_size 3584.
HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1_000_000.0,
    "mrope_section": [16, 24, 24],
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
HF_VISION_DEFAULTS: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 3584,
    "hidden_act": "silu",
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "tokens_per_second": 4,
    "window_size": 112,
    "out_hidden_size": 3584,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "rope_theta": 10000.0,
}
HF_TOKEN_DEFAULTS: dict[str, int] = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
}


def _rope_theta(section: dict[str, Any], default: float) -> float:
    """transformers' precedence: rope_scaling / rope_parameters["rope_theta"], then a plain rope_theta key."""
    rope = section.get("rope_scaling") or section.get("rope_parameters") or {}
    return float(rope.get("rope_theta", section.get("rope_theta", default)))


def text_from_hf_config(cfg: dict[str, Any]) -> tuple[TextConfig, dict[str, Any]]:
    """The decoder section and the special token ids of an HF `config.json` dict (flat hub layout or the 5.x nested
    `text_config` one), a missing key taking transformers' default; shared by the Qwen-VL families."""
    nested = cfg.get("text_config")
    text = {**HF_TEXT_DEFAULTS, **(nested if nested is not None else cfg)}
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    # Pre-5.x saves keep tie_word_embeddings inside text_config; transformers ties when either level says so.
    tied = bool(cfg.get("tie_word_embeddings", False)) or bool((nested or {}).get("tie_word_embeddings", False))
    t = TextConfig(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"] or text["num_attention_heads"],
        rms_norm_eps=float(text["rms_norm_eps"]),
        rope_theta=_rope_theta(text, HF_TEXT_DEFAULTS["rope_theta"]),
        mrope_section=tuple(rope.get("mrope_section", HF_TEXT_DEFAULTS["mrope_section"])),
        max_position_embeddings=text["max_position_embeddings"],
        tie_word_embeddings=tied,
        hidden_act=text["hidden_act"],
    )
    ids = {k: cfg.get(k, (nested or {}).get(k, default)) for k, default in HF_TOKEN_DEFAULTS.items()}
    return t, {**ids, "bos_token_id": text["bos_token_id"], "eos_token_id": text["eos_token_id"]}


def check_model_type(cfg: dict[str, Any], model_type: str) -> None:
    """ValueError unless config.json's `model_type` is `model_type` (or absent)."""
    if cfg.get("model_type") not in (None, model_type):
        raise ValueError(f"config.json model_type is {cfg.get('model_type')!r}, expected {model_type!r}")


def from_hf_config(cfg: dict[str, Any]) -> Qwen25VLConfig:
    """Build a config from an HF `config.json` dict: the flat hub layout or the 5.x nested `text_config` one.

    Reads like transformers 5.x: text fields from `text_config` when present (else from the top level), missing keys
    take transformers' defaults; the result is validated (special ids must lie inside the vocabulary).
    """
    check_model_type(cfg, "qwen2_5_vl")
    t, ids = text_from_hf_config(cfg)
    raw_vision = cfg.get("vision_config") or {}
    vc = {**HF_VISION_DEFAULTS, **raw_vision}
    v = VisionConfig(
        depth=vc["depth"],
        hidden_size=vc["hidden_size"],
        num_heads=vc["num_heads"],
        intermediate_size=vc["intermediate_size"],
        out_hidden_size=vc["out_hidden_size"],
        patch_size=vc["patch_size"],
        temporal_patch_size=vc["temporal_patch_size"],
        spatial_merge_size=vc["spatial_merge_size"],
        window_size=vc["window_size"],
        fullatt_block_indexes=tuple(vc["fullatt_block_indexes"]),
        tokens_per_second=float(vc["tokens_per_second"]),
        in_channels=raw_vision.get("in_channels", raw_vision.get("in_chans", vc["in_channels"])),
        hidden_act=vc["hidden_act"],
        rope_theta=_rope_theta(raw_vision, HF_VISION_DEFAULTS["rope_theta"]),
    )
    return Qwen25VLConfig(text=t, vision=v, **ids).validate()


# Vision keys transformers 5.x's strict config validation wants as integers.
INT_VISION_KEYS = (
    "depth",
    "hidden_size",
    "num_heads",
    "patch_size",
    "spatial_merge_size",
    "window_size",
    "tokens_per_second",
    "temporal_patch_size",
)


def hf_config_problems(raw: dict[str, Any]) -> list[str]:
    """What a release's config.json lacks for the readers of a Qwen-VL release: the flat hub layout's
    `rope_scaling.mrope_section` (transformers 4.x, older vLLM) and integer vision sizes (transformers 5.x)."""
    problems = []
    if "mrope_section" not in (raw.get("rope_scaling") or {}):
        problems.append(
            "config.json: no top-level rope_scaling.mrope_section (not the flat hub layout that "
            "transformers 4.x and older vLLM read)"
        )
    vision = raw.get("vision_config") or {}
    floats = [k for k in INT_VISION_KEYS if isinstance(vision.get(k), float)]
    if floats:
        problems.append(
            f"config.json: vision_config {', '.join(floats)} must be integers (transformers 5.x's "
            f"strict config validation refuses floats)"
        )
    return problems


def text_to_hf_config(cfg: Qwen25VLConfig, torch_dtype: str) -> dict[str, Any]:
    """The flat hub-style `config.json` keys of the decoder and the special token ids (every Qwen-VL family's)."""
    t = cfg.text
    return {
        "torch_dtype": torch_dtype,
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "vision_token_id": cfg.vision_token_id,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "hidden_act": t.hidden_act,
        "hidden_size": t.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "max_window_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "sliding_window": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": t.vocab_size,
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
    }


def to_hf_config(cfg: Qwen25VLConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """The flat, hub-style `config.json` that transformers 4.49+ / 5.x and vLLM all read."""
    v = cfg.vision
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **text_to_hf_config(cfg, torch_dtype),
        "vision_config": {
            "depth": v.depth,
            "hidden_act": v.hidden_act,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_chans": v.in_channels,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "spatial_patch_size": v.patch_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            # transformers 5.x requires an int here when it is whole (the hub files hold 2).
            "tokens_per_second": int(v.tokens_per_second)
            if float(v.tokens_per_second).is_integer()
            else v.tokens_per_second,
            "temporal_patch_size": v.temporal_patch_size,
        },
    }
