"""Qwen2.5-VL's HF checkpoint layout against our parameter tree, as ONE table of rules.

A rule is (our parameter path, HF tensor name, transform). `{a,b,...}` groups expand in step on both sides (the
k-th alternative of ours goes with the k-th of HF's). `{i}` in the HF name marks a stacked parameter: ours holds
every layer on a leading axis (`models.layers.stacked`; the same tensors with scan_layers on or off), HF holds one
tensor per layer. The transform maps one (per-layer) tensor between the layouts: our Linear kernels are [in, out],
torch's [out, in]; our patch embedding is a matmul, HF's a Conv3d.

Everything about the layout derives from the table: names both ways, loading and saving (`converters.hf`), the
shapes a release must have (`converters.check`) and PEFT module names (`converters.peft`). HF names here are the
hub ("legacy") ones every reader accepts (`visual.*`, `model.*`, `lm_head.*`); transformers 5 names the modules
`model.visual.*` / `model.language_model.*` in memory (`HF_PREFIXES` maps between the two).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Sequence

import numpy as np
from flax import nnx

from vlmr1_jax.models.qwen2_5_vl.config import Qwen25VLConfig


@dataclasses.dataclass(frozen=True)
class Transform:
    """One tensor ours -> HF (`to_hf`, which may need the config) and HF -> ours (`from_hf`), exact both ways."""

    name: str
    to_hf: Callable[[np.ndarray, Qwen25VLConfig], np.ndarray]
    from_hf: Callable[[np.ndarray], np.ndarray]


def _transpose(value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.T)


def _patch_embed_to_hf(value: np.ndarray, cfg: Qwen25VLConfig) -> np.ndarray:
    """[C*T*P*P, hidden] matmul weight -> the Conv3d weight [hidden, C, T, P, P]."""
    v = cfg.vision
    return _transpose(value).reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


IDENTITY = Transform("identity", lambda value, _cfg: value, lambda value: value)
TRANSPOSE = Transform("transpose", lambda value, _cfg: _transpose(value), _transpose)
PATCH_EMBED = Transform(
    "conv3d patch embedding", _patch_embed_to_hf, lambda value: _transpose(value.reshape(value.shape[0], -1))
)


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str  # our dotted parameter path; {a,b} groups expand in step with `hf`'s
    hf: str  # legacy HF tensor name; {i}: one tensor per layer of our stacked parameter
    transform: Transform


VISION_RULES: tuple[Rule, ...] = (
    Rule("visual.patch_embed", "visual.patch_embed.proj.weight", PATCH_EMBED),
    Rule("visual.blocks.{norm1,norm2}.scale", "visual.blocks.{i}.{norm1,norm2}.weight", IDENTITY),
    Rule("visual.blocks.attn.{qkv,proj}.kernel", "visual.blocks.{i}.attn.{qkv,proj}.weight", TRANSPOSE),
    Rule("visual.blocks.attn.{qkv,proj}.bias", "visual.blocks.{i}.attn.{qkv,proj}.bias", IDENTITY),
    Rule(
        "visual.blocks.mlp.{gate,up,down}.kernel",
        "visual.blocks.{i}.mlp.{gate_proj,up_proj,down_proj}.weight",
        TRANSPOSE,
    ),
    Rule("visual.blocks.mlp.{gate,up,down}.bias", "visual.blocks.{i}.mlp.{gate_proj,up_proj,down_proj}.bias", IDENTITY),
    Rule("visual.merger.ln_q.scale", "visual.merger.ln_q.weight", IDENTITY),
    Rule("visual.merger.{fc1,fc2}.kernel", "visual.merger.mlp.{0,2}.weight", TRANSPOSE),
    Rule("visual.merger.{fc1,fc2}.bias", "visual.merger.mlp.{0,2}.bias", IDENTITY),
)
# The Qwen2 decoder, shared with the Qwen2-VL family.
TEXT_RULES: tuple[Rule, ...] = (
    Rule("text.embed", "model.embed_tokens.weight", IDENTITY),
    Rule(
        "text.layers.{input_norm,post_norm}.scale",
        "model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight",
        IDENTITY,
    ),
    Rule(
        "text.layers.attn.{q,k,v,o}.kernel",
        "model.layers.{i}.self_attn.{q_proj,k_proj,v_proj,o_proj}.weight",
        TRANSPOSE,
    ),
    Rule("text.layers.attn.{q,k,v}.bias", "model.layers.{i}.self_attn.{q_proj,k_proj,v_proj}.bias", IDENTITY),
    Rule(
        "text.layers.mlp.{gate,up,down}.kernel", "model.layers.{i}.mlp.{gate_proj,up_proj,down_proj}.weight", TRANSPOSE
    ),
    Rule("text.norm.scale", "model.norm.weight", IDENTITY),
    Rule("text.lm_head.kernel", "lm_head.weight", TRANSPOSE),
)
RULES = VISION_RULES + TEXT_RULES

# (transformers 5 in-memory prefix, legacy hub prefix): the two HF naming schemes, which differ only in these.
HF_PREFIXES: tuple[tuple[str, str], ...] = (("model.visual.", "visual."), ("model.language_model.", "model."))

_GROUP = re.compile(r"\{([^{}]*,[^{}]*)\}")  # an {a,b,...} alternative group ({i}, without a comma, is not one)


def expand(rule: Rule) -> list[tuple[str, str]]:
    """(our path, HF name template) for every alternative of `rule`."""
    ours = [g.split(",") for g in _GROUP.findall(rule.ours)]
    if [len(g) for g in ours] != [len(g.split(",")) for g in _GROUP.findall(rule.hf)]:
        raise ValueError(f"layout rule {rule.ours!r} <-> {rule.hf!r}: the {{a,b}} groups do not pair up")

    def fill(pattern: str, picks: tuple[int, ...]) -> str:
        it = iter(picks)
        return _GROUP.sub(lambda m: m.group(1).split(",")[next(it)], pattern)

    return [
        (fill(rule.ours, picks), fill(rule.hf, picks)) for picks in itertools.product(*(range(len(g)) for g in ours))
    ]


def _index(rules: Sequence[Rule]) -> dict[str, tuple[str, Transform]]:
    """Our path -> (HF name template, transform); a path or an HF name claimed twice is a bug in the table."""
    layout: dict[str, tuple[str, Transform]] = {}
    for rule in rules:
        for ours, hf in expand(rule):
            if ours in layout or hf in {t for t, _ in layout.values()}:
                raise ValueError(f"layout rule {rule.ours!r} <-> {rule.hf!r}: {ours} / {hf} already has a rule")
            layout[ours] = (hf, rule.transform)
    return layout


class Layout:
    """One family's HF <-> ours table (`rules`) and what derives from it; `model_class()` gives the family's model
    class (imported on first use), whose abstract parameters `expected_hf_shapes` reads."""

    def __init__(self, rules: Sequence[Rule], model_class: Callable[[], Callable[..., nnx.Module]]):
        self.table = _index(rules)
        self.model_class = model_class
        # Our tree has no head when tie_word_embeddings is set; some HF exports still store this copy of the embedding.
        self.tied_head = self.to_hf_name("text.lm_head.kernel")

    def layout_of(self, path: str) -> tuple[str, Transform]:
        """(HF name template, transform) of our parameter `path`."""
        try:
            return self.table[path]
        except KeyError:
            raise KeyError(f"no HF layout rule for parameter {path!r} (see {__name__}.RULES)") from None

    def is_stacked(self, path: str) -> bool:
        """Whether our parameter `path` holds one tensor per layer on a leading axis (HF: one name per layer)."""
        return "{i}" in self.layout_of(path)[0]

    def to_hf_name(self, path: str, layer: int | None = None) -> str:
        """Our dotted parameter path (and, for stacked layers, the layer index) -> the legacy HF tensor name."""
        template = self.layout_of(path)[0]
        if ("{i}" in template) != (layer is not None):
            raise ValueError(f"{path}: a layer index is {'required' if layer is None else 'not allowed'}")
        return template.replace("{i}", str(layer))

    def to_hf_tensor(self, path: str, value: np.ndarray, cfg: Qwen25VLConfig) -> np.ndarray:
        """Our array (one layer of a stacked parameter) -> the HF tensor layout."""
        return self.layout_of(path)[1].to_hf(value, cfg)

    def from_hf_tensor(self, path: str, value: np.ndarray) -> np.ndarray:
        """HF tensor -> our layout (the inverse of `to_hf_tensor`)."""
        return self.layout_of(path)[1].from_hf(value)

    def hf_shape(self, path: str, shape: Sequence[int], cfg: Qwen25VLConfig) -> tuple[int, ...]:
        """Shape of our (per-layer) parameter `path` in the HF layout: its transform applied to a zero-byte array."""
        return tuple(self.to_hf_tensor(path, np.empty(tuple(shape), np.dtype([])), cfg).shape)

    def hf_entries(self, state: nnx.State) -> list[tuple[str, str, int | None, tuple[int, ...]]]:
        """(HF name, our path, layer index or None, our per-layer shape) for every tensor HF stores, in HF order
        (layer by layer): one entry per layer of each stacked parameter."""
        entries: list[tuple[str, str, int | None, tuple[int, ...]]] = []
        for path, var in flat_paths(state).items():
            if self.is_stacked(path):
                entries += [(self.to_hf_name(path, i), path, i, tuple(var.shape[1:])) for i in range(var.shape[0])]
            else:
                entries.append((self.to_hf_name(path), path, None, tuple(var.shape)))
        natural = lambda entry: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", entry[0])]
        return sorted(entries, key=natural)

    def expected_hf_shapes(self, cfg: Qwen25VLConfig) -> dict[str, tuple[int, ...]]:
        """Legacy HF name -> shape of every tensor a checkpoint of `cfg` holds (our abstract model, no memory)."""
        model_class = self.model_class()
        abstract = nnx.eval_shape(lambda: model_class(cfg, rngs=nnx.Rngs(0)))
        entries = self.hf_entries(nnx.state(abstract, nnx.Param))
        return {name: self.hf_shape(path, shape, cfg) for name, path, _, shape in entries}

    def hf_module_name(self, module_path: str, layer: int | None = None) -> str:
        """Our Dense path (e.g. `text.layers.attn.q`, layer 0) -> its transformers 5 module name
        (`model.language_model.layers.0.self_attn.q_proj`), which PEFT adapters are keyed by."""
        return in_memory_hf_name(self.to_hf_name(module_path + ".kernel", layer).removesuffix(".weight"))


def _model_class() -> Callable[..., nnx.Module]:
    from vlmr1_jax.models.qwen2_5_vl.model import Qwen25VL

    return Qwen25VL


# The module-level API `ModelFamily.layout` exposes (a variant family's params module binds its own `Layout`).
QWEN2_5_VL = Layout(RULES, _model_class)
LAYOUT = QWEN2_5_VL.table
layout_of = QWEN2_5_VL.layout_of
is_stacked = QWEN2_5_VL.is_stacked
to_hf_name = QWEN2_5_VL.to_hf_name
to_hf_tensor = QWEN2_5_VL.to_hf_tensor
from_hf_tensor = QWEN2_5_VL.from_hf_tensor
hf_shape = QWEN2_5_VL.hf_shape
hf_entries = QWEN2_5_VL.hf_entries
expected_hf_shapes = QWEN2_5_VL.expected_hf_shapes
hf_module_name = QWEN2_5_VL.hf_module_name
TIED_HEAD = QWEN2_5_VL.tied_head


def flat_paths(state: nnx.State) -> dict[str, nnx.Variable]:
    """Dotted path -> Variable for every parameter of a model state."""
    return {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def canonical_hf_name(name: str) -> str:
    """An HF name in either scheme (transformers 5 in-memory `model.visual.*` / `model.language_model.*`, or
    legacy) -> the legacy hub name."""
    for in_memory, legacy in HF_PREFIXES:
        if name.startswith(in_memory):
            return legacy + name[len(in_memory) :]
    return name


def in_memory_hf_name(name: str) -> str:
    """A legacy HF name -> the name transformers 5 gives it in memory (the inverse of `canonical_hf_name`)."""
    for in_memory, legacy in HF_PREFIXES:
        if name.startswith(legacy):
            return in_memory + name[len(legacy) :]
    return name
