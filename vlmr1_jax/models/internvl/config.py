"""InternVL (InternViT + pixel shuffle + MLP projector + a Qwen2 decoder): presets and the config.json mapping.

Two config.json layouts are read: transformers' native `InternVLForConditionalGeneration` (`text_config`,
`vision_config`, `downsample_ratio`, `vision_feature_layer`) and OpenGVLab's original `InternVLChatModel`
release (`llm_config`, `vision_config`, `select_layer`, `template`, `ps_version`). The native one is written.
The decoder is ours for Qwen2.5-VL (`qwen2_5_vl.text`): a Qwen2 decoder whose M-RoPE, fed three equal position
rows, is plain 1-D RoPE, so the text config keeps every rotary frequency in its first section.
Covered: InternVL2.5 / InternVL3 sizes on Qwen2 / Qwen2.5 decoders; InternLM2 / InternLM3 / Llama decoders
(InternVL2.5-2B, -8B, -26B, InternVL3-9B) are refused by name.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

from vlmr1_jax.models.layers import ACTIVATIONS
from vlmr1_jax.models.qwen2_5_vl.config import TextConfig

# Special token ids of a finalised config: each must index the text vocabulary.
TOKEN_ID_FIELDS = ("image_token_id", "image_start_token_id", "image_end_token_id", "eos_token_id", "pad_token_id")
NORM_TYPES = ("layer_norm", "rms_norm")
ARCHITECTURES = ("InternVLForConditionalGeneration", "InternVLChatModel")  # native (written first), original


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """InternViT: square tiles of `image_size` pixels cut into `patch_size` patches, a CLS token, learned
    absolute positions, pre-norm blocks with layer scale."""

    image_size: int = 448
    patch_size: int = 14
    in_channels: int = 3
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    qk_norm: bool = False  # RMSNorm over the whole q / k projections (InternViT-6B)
    norm_type: str = "layer_norm"  # or "rms_norm"
    norm_eps: float = 1e-6
    layer_scale_init: float = 0.1  # initial value of ls1 / ls2 (random init only)
    feature_layer: int = -1  # the hidden state the projector reads: -1 the last block's, 0 the embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per tile side (32 for 448-pixel tiles)."""
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * p * p."""
        return self.in_channels * self.patch_size**2

    @property
    def used_layers(self) -> int:
        """Blocks run to reach `feature_layer` (hidden state k is the output of block k; 0 the embeddings)."""
        return self.feature_layer % (self.num_layers + 1)


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    downsample_ratio: float = 0.5  # pixel shuffle: (1 / ratio)^2 neighbouring patches become one token
    projector_hidden_act: str = "gelu"
    image_token_id: int = 151667  # <IMG_CONTEXT>
    image_start_token_id: int = 151665  # <img>
    image_end_token_id: int = 151666  # </img>
    eos_token_id: int = 151645  # <|im_end|>: the separator of InternVL's Qwen conversation templates
    pad_token_id: int = 151643  # <|endoftext|>
    family: str = "internvl"

    @property
    def shuffle(self) -> int:
        """Side of the patch neighbourhood one visual token merges (2 for ratio 0.5)."""
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_side(self) -> int:
        return self.vision.grid // self.shuffle

    @property
    def num_image_token(self) -> int:
        """Visual tokens per tile: (448 / 14 * 0.5)^2 = 256 for the released models."""
        return self.tokens_per_side**2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InternVLConfig:
        """Inverse of `dataclasses.asdict` (lists back to tuples), e.g. for checkpoint metadata."""
        text: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data["text"].items()}
        rest = {k: v for k, v in data.items() if k not in ("text", "vision")}
        return cls(text=TextConfig(**text), vision=VisionConfig(**data["vision"]), **rest).validate()

    def validate(self, check_token_ids: bool = True) -> InternVLConfig:
        """Raise ValueError naming the field on an inconsistent config; `check_token_ids=False` only for presets
        whose ids and vocabulary come from a tokenizer later (`with_overrides`)."""
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(
                f"text hidden_size {t.hidden_size}, num_attention_heads {t.num_attention_heads} and "
                f"num_key_value_heads {t.num_key_value_heads} must divide evenly"
            )
        if tuple(t.mrope_section) != (t.head_dim // 2, 0, 0):
            raise ValueError(f"text mrope_section {t.mrope_section} must be {(t.head_dim // 2, 0, 0)} (1-D RoPE)")
        if v.hidden_size % v.num_heads:
            raise ValueError(f"vision hidden_size {v.hidden_size} not divisible by num_heads {v.num_heads}")
        if v.image_size % v.patch_size:
            raise ValueError(f"vision image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if v.norm_type not in NORM_TYPES:
            raise ValueError(f"vision norm_type {v.norm_type!r}: choose one of {NORM_TYPES}")
        for name, act in (("vision hidden_act", v.hidden_act), ("projector_hidden_act", self.projector_hidden_act)):
            if act not in ACTIVATIONS:
                raise ValueError(f"{name} {act!r}: choose one of {sorted(ACTIVATIONS)}")
        if not -(v.num_layers + 1) <= v.feature_layer <= v.num_layers:
            raise ValueError(f"vision feature_layer {v.feature_layer} is outside the {v.num_layers}-block tower")
        if not 0 < self.downsample_ratio <= 1 or abs(1 / self.downsample_ratio - self.shuffle) > 1e-9:
            raise ValueError(f"downsample_ratio {self.downsample_ratio} must be 1/n for a whole n (0.5 released)")
        if v.grid % self.shuffle:
            raise ValueError(
                f"vision grid {v.grid} (image_size / patch_size) is not a multiple of 1/downsample_ratio {self.shuffle}"
            )
        if check_token_ids:
            for name in TOKEN_ID_FIELDS:
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value < t.vocab_size:  # type: ignore[operator]
                    raise ValueError(
                        f"{name} {value!r} is not a token id of the {t.vocab_size}-token vocabulary "
                        f"(text vocab_size): set {name} to the tokenizer's id, below {t.vocab_size}"
                    )
        return self


def _text(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, **rest: Any) -> TextConfig:
    """A Qwen2 decoder config with 1-D RoPE (every frequency in the first M-RoPE section)."""
    return TextConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        mrope_section=(hidden // heads // 2, 0, 0),
        **rest,
    )


# Released sizes on Qwen2.5 decoders, all with InternViT-300M-448px (V2.5) and an untied LM head over InternVL's
# 151674-token vocabulary. Their 1B / 2B / 4B / 8B decoders are Qwen2.5-0.5B / 1.5B / 3B / 7B.
_RELEASED_TEXT = dict(
    vocab_size=151674, rope_theta=1_000_000.0, max_position_embeddings=32768, tie_word_embeddings=False
)
PRESETS: dict[str, InternVLConfig] = {
    "internvl2.5-1b": InternVLConfig(text=_text(896, 4864, 24, 14, 2, **_RELEASED_TEXT)).validate(),
    "internvl2.5-4b": InternVLConfig(text=_text(2048, 11008, 36, 16, 2, **_RELEASED_TEXT)).validate(),
    "internvl3-1b": InternVLConfig(text=_text(896, 4864, 24, 14, 2, **_RELEASED_TEXT)).validate(),
    "internvl3-2b": InternVLConfig(text=_text(1536, 8960, 28, 12, 2, **_RELEASED_TEXT)).validate(),
    "internvl3-8b": InternVLConfig(text=_text(3584, 18944, 28, 28, 4, **_RELEASED_TEXT)).validate(),
    # Every code path at toy widths, with 56-pixel tiles of 4 visual tokens (the processor cuts the model's tile
    # size), so a CPU run encodes 4 tokens per tile, not the releases' 256.
    "tiny": InternVLConfig(
        text=_text(
            64, 96, 2, 4, 2, vocab_size=160, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False
        ),
        vision=VisionConfig(image_size=56, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=48),
        image_token_id=152,
        image_start_token_id=150,
        image_end_token_id=151,
        eos_token_id=1,
        pad_token_id=0,
    ).validate(),
    # `vlmr1 demo --family internvl`: Qwen2.5-VL's demo-s decoder behind a two-block InternViT with 56-pixel tiles
    # (a 112-pixel image: 2 x 2 tiles and the thumbnail, 20 tokens); ids and vocabulary come from the demo's tokenizer.
    "demo-s": InternVLConfig(
        text=_text(128, 512, 2, 4, 2, vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=True),
        vision=VisionConfig(image_size=56, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256),
    ).validate(check_token_ids=False),
}
ALIASES = {"1b": "internvl3-1b", "2b": "internvl3-2b", "4b": "internvl2.5-4b", "8b": "internvl3-8b"}


def get_preset(name: str) -> InternVLConfig:
    """A preset by name or short alias ("4b" = "internvl2.5-4b", the model of VLM-R1's InternVL REC recipe)."""
    try:
        return PRESETS[ALIASES.get(str(name).lower(), name)]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}, aliases {sorted(ALIASES)}") from None


def with_overrides(cfg: InternVLConfig, overrides: dict[str, Any]) -> InternVLConfig:
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
    if "hidden_size" in sections["text"] or "num_attention_heads" in sections["text"]:
        text = dataclasses.replace(cfg.text, **sections["text"])
        sections["text"].setdefault("mrope_section", (text.head_dim // 2, 0, 0))
    return dataclasses.replace(
        cfg,
        text=dataclasses.replace(cfg.text, **sections["text"]),
        vision=dataclasses.replace(cfg.vision, **sections["vision"]),
        **sections[""],
    ).validate()


# What a key missing from config.json means to transformers 5.24 (Qwen2Config, InternVLVisionConfig and
# InternVLConfig defaults), and to the original release's classes where they differ (noted).
HF_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # = num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "use_sliding_window": False,
}
HF_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "norm_type": "layer_norm",
    "layer_norm_eps": 1e-6,
    "image_size": 448,
    "patch_size": 14,
    "num_channels": 3,
    "layer_scale_init_value": 0.1,
    "attention_bias": False,  # the original InternVisionConfig: qkv_bias, default True
    "use_qk_norm": False,  # the original: qk_normalization
}
# The original release's InternVisionConfig: its defaults (an InternViT-6B) and its names for native keys.
ORIGINAL_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 3200,
    "num_hidden_layers": 48,
    "num_attention_heads": 25,
    "intermediate_size": 12800,
    "image_size": 224,
    "qkv_bias": False,
    "qk_normalization": True,
    "norm_type": "rms_norm",
    "initializer_factor": 0.1,
}
ORIGINAL_VISION_KEYS = {
    "qkv_bias": "attention_bias",
    "qk_normalization": "use_qk_norm",
    "initializer_factor": "layer_scale_init_value",
}
# Rotary variants equal to plain RoPE at every position the decoder reaches: "dynamic" NTK scaling changes the
# frequencies only past max_position_embeddings (InternVL2.5-1B and InternVL3-1B ship it, factor 2).
SUPPORTED_ROPE_TYPES = ("default", "dynamic")


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) else value


def _text_config(text: dict[str, Any], tied: bool, where: str) -> TextConfig:
    """Our decoder config from a Qwen2 config dict (transformers 4.x or 5.x keys); other decoders are refused."""
    arch = text.get("architectures") or []
    if text.get("model_type", "qwen2") != "qwen2" or any(a != "Qwen2ForCausalLM" for a in arch):
        raise ValueError(
            f"{where}: the language model is {text.get('model_type')!r} {arch}; vlmr1-jax covers InternVL sizes with "
            "Qwen2 / Qwen2.5 decoders only (not the InternLM2 / Llama ones: InternVL2.5-2B, -8B, -26B, InternVL3-9B)"
        )
    t = {**HF_TEXT_DEFAULTS, **text}
    if t["use_sliding_window"]:
        raise ValueError(f"{where}: use_sliding_window is true; InternVL's decoders attend to every earlier token")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{where}: rope type {kind!r} is not supported (only {SUPPORTED_ROPE_TYPES})")
    heads = t["num_attention_heads"]
    return TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=t["num_key_value_heads"] or heads,
        rms_norm_eps=float(t["rms_norm_eps"]),
        rope_theta=float(rope.get("rope_theta", t["rope_theta"])),
        mrope_section=(t["hidden_size"] // heads // 2, 0, 0),
        max_position_embeddings=t["max_position_embeddings"],
        tie_word_embeddings=tied,
        hidden_act=t["hidden_act"],
    )


def _side(value: Any) -> int:
    """image_size / patch_size as one int (transformers stores [h, w]); non-square tiles are refused."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {list(value)} is not supported (InternVL tiles are square)")
        value = value[0]
    return int(value)


def _vision_config(vision: dict[str, Any], feature_layer: int, where: str) -> VisionConfig:
    """InternViT's config from native `vision_config` keys; the variants no released InternVL uses are refused by
    name."""
    v = {**HF_VISION_DEFAULTS, **vision}
    for key, fine in (
        ("use_mask_token", False),
        ("use_mean_pooling", True),
        ("use_absolute_position_embeddings", True),
    ):
        if vision.get(key, fine) != fine:
            raise ValueError(f"{where}: vision_config.{key}={vision[key]!r} is not supported (InternVL uses {fine})")
    return VisionConfig(
        image_size=_side(v["image_size"]),
        patch_size=_side(v["patch_size"]),
        in_channels=v["num_channels"],
        hidden_size=v["hidden_size"],
        num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"],
        hidden_act=v["hidden_act"],
        qkv_bias=bool(v["attention_bias"]),
        qk_norm=bool(v["use_qk_norm"]),
        norm_type=v["norm_type"],
        norm_eps=float(v["layer_norm_eps"]),
        layer_scale_init=float(v["layer_scale_init_value"]),
        feature_layer=feature_layer,
    )


def _token_ids(raw: dict[str, Any], text: dict[str, Any], image_token_id: int) -> dict[str, Any]:
    """The special ids: <img> and </img> precede <IMG_CONTEXT> in every InternVL tokenizer (unless written out);
    EOS / pad from the decoder config, pad falling back to its BOS (<|endoftext|> in InternVL's Qwen tokenizers)."""
    pad = text.get("pad_token_id")
    return {
        "image_token_id": image_token_id,
        "image_start_token_id": raw.get("image_start_token_id", image_token_id - 2),
        "image_end_token_id": raw.get("image_end_token_id", image_token_id - 1),
        "eos_token_id": _first(text.get("eos_token_id", InternVLConfig.eos_token_id)),
        "pad_token_id": _first(pad if pad is not None else text.get("bos_token_id", InternVLConfig.pad_token_id)),
    }


def from_hf_config(cfg: dict[str, Any]) -> InternVLConfig:
    """Our config from a config.json dict: transformers' native `InternVLForConditionalGeneration` or the
    original `InternVLChatModel` release. Missing keys take their class's defaults; the result is validated."""
    if cfg.get("model_type") == "internvl_chat" or "llm_config" in cfg:
        return _from_original(cfg)
    if cfg.get("model_type") not in (None, "internvl"):
        raise ValueError(f"config.json model_type is {cfg.get('model_type')!r}, expected 'internvl'")
    text = cfg.get("text_config") or {}
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError("config.json vision_feature_select_strategy must be 'default' (the CLS token is dropped)")
    layer = cfg.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ValueError(f"config.json vision_feature_layer {layer!r}: one layer index is supported")
    # transformers 5 ties the head by the top-level key (default true); configs that only set it in text_config
    # (4.x saves) mean that value.
    tied = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))
    return InternVLConfig(
        text=_text_config(text, tied, "config.json text_config"),
        vision=_vision_config(cfg.get("vision_config") or {}, layer, "config.json"),
        downsample_ratio=float(cfg.get("downsample_ratio", 0.5)),
        projector_hidden_act=cfg.get("projector_hidden_act", "gelu"),
        **_token_ids(cfg, text, cfg.get("image_token_id", InternVLConfig.image_token_id)),
    ).validate()


def _from_original(cfg: dict[str, Any]) -> InternVLConfig:
    """The original release's config.json (`InternVLChatModel`, remote code): its `llm_config` builds a
    Qwen2ForCausalLM, which ties its head only when `llm_config` says so; the projector is LayerNorm, Linear,
    GELU, Linear."""
    if cfg.get("ps_version", "v1") != "v2":
        raise ValueError(
            f"config.json ps_version {cfg.get('ps_version', 'v1 (the default)')!r}: only the 'v2' pixel shuffle of "
            "InternVL2 and later is supported"
        )
    raw = cfg.get("vision_config") or {}
    vision = {**ORIGINAL_VISION_DEFAULTS, **raw}
    forced = cfg.get("force_image_size")
    if forced not in (None, vision["image_size"]):
        raise ValueError(
            f"config.json force_image_size {forced} != vision_config.image_size {vision['image_size']}: "
            "interpolated position embeddings are not supported"
        )
    native = {**vision, **{new: vision[old] for old, new in ORIGINAL_VISION_KEYS.items() if old in vision}}
    text = cfg.get("llm_config") or {}
    return InternVLConfig(
        text=_text_config(text, bool(text.get("tie_word_embeddings", False)), "config.json llm_config"),
        vision=_vision_config(native, cfg.get("select_layer", -1), "config.json"),
        downsample_ratio=float(cfg.get("downsample_ratio", 0.5)),
        # The original config does not name <IMG_CONTEXT>: 151667 in every Qwen-based InternVL tokenizer.
        **_token_ids(cfg, text, InternVLConfig.image_token_id),
    ).validate()


def hf_config_problems(raw: dict[str, Any]) -> list[str]:
    """A release must be in the native layout (transformers 5 and vLLM read it; the original needs remote code)."""
    if raw.get("architectures") != [ARCHITECTURES[0]]:
        return [
            f"config.json: architectures {raw.get('architectures')}, expected [{ARCHITECTURES[0]!r}] (the native "
            "layout transformers and vLLM read; `vlmr1 export` writes it)"
        ]
    return []


def to_hf_config(cfg: InternVLConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """transformers' native config.json (`InternVLForConditionalGeneration`, what transformers 5 and vLLM read),
    plus the <img> / </img> ids, which it does not name."""
    t, v = cfg.text, cfg.vision
    return {
        "architectures": [ARCHITECTURES[0]],
        "model_type": "internvl",
        "torch_dtype": torch_dtype,
        "downsample_ratio": cfg.downsample_ratio,
        "projector_hidden_act": cfg.projector_hidden_act,
        "vision_feature_layer": v.feature_layer,
        "vision_feature_select_strategy": "default",
        "image_token_id": cfg.image_token_id,
        "image_seq_length": cfg.num_image_token,
        "image_start_token_id": cfg.image_start_token_id,
        "image_end_token_id": cfg.image_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "text_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "use_sliding_window": False,
            "tie_word_embeddings": t.tie_word_embeddings,
            "bos_token_id": cfg.pad_token_id,
            "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id,
        },
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "hidden_act": v.hidden_act,
            "attention_bias": v.qkv_bias,
            "use_qk_norm": v.qk_norm,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.norm_eps,
            "image_size": [v.image_size, v.image_size],
            "patch_size": [v.patch_size, v.patch_size],
            "num_channels": v.in_channels,
            "layer_scale_init_value": v.layer_scale_init,
            "use_absolute_position_embeddings": True,
            "use_mask_token": False,
            "use_mean_pooling": True,
        },
    }
