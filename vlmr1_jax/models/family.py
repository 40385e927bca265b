"""The model-family interface (VLM-R1's "VLM module") and its registry.

Everything outside `models/<family>/` reaches a model family through a `ModelFamily`: its config (from a preset, an
HF `config.json`, or checkpoint metadata, and back to `config.json`), the model class, the HF <-> ours parameter
layout, and its processor (images -> pixel rows, the prompt template, positions and vision arrays of a prompt batch,
and the frame its boxes live in, which the REC rewards rescale from). The sampler, the train steps, rewards, the
converters, export and evaluation never import a family's modules and never branch on a family name; they call
`family_of(cfg)` (configs carry their family's name) or `family_for_hf_config(...)`.

Adding a family is one folder (`models/<family>/` with a `family.py` defining `FAMILY`) and one line in
`BUILTIN_FAMILIES`; docs/adding-a-model.md says what each part must do.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import jax
from flax import nnx

from vlmr1_jax.models.processor import Processor

# name -> the module that defines its `FAMILY`; imported on first use, so a family costs nothing until asked for.
BUILTIN_FAMILIES: dict[str, str] = {
    "qwen2_5_vl": "vlmr1_jax.models.qwen2_5_vl.family",
    "internvl": "vlmr1_jax.models.internvl.family",
    "qwen2_vl": "vlmr1_jax.models.qwen2_vl.family",
}


class VisionLanguageModel(nnx.Module):
    """The base of every family's model: what the sampler, the train steps and the converters call on it."""

    cfg: Any  # the family's config (carries `family`, `text`, `vision`, the special token ids)
    text: Any  # the decoder: `.logits(hidden)`, `.logits_chunk`, `.dtype` (the chunked log-probs split it)

    def encode_vision(self, inputs: Mapping[str, jax.Array]) -> jax.Array:
        """The visual tokens of a prompt batch's images, from the vision arrays its processor made
        (`PromptBatch.vision`); `vision_gather` indexes its rows."""
        raise NotImplementedError

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        vision_features: jax.Array | None = None,
        vision_gather: jax.Array | None = None,
        cache: Any = None,
    ) -> tuple[jax.Array, Any]:
        """Final hidden states and the updated cache."""
        raise NotImplementedError

    def logits(self, hidden: jax.Array) -> jax.Array:
        raise NotImplementedError

    def init_cache(self, batch: int, length: int) -> Any:
        """An empty KV cache for `batch` rows of up to `length` tokens."""
        raise NotImplementedError

    def set_remat(self, remat: str) -> None:
        raise NotImplementedError

    def set_scan_layers(self, scan: bool) -> None:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One model family, as the rest of vlmr1-jax sees it."""

    name: str  # the `model.family` value of a recipe; configs carry it as `cfg.family`
    architectures: tuple[str, ...]  # HF config.json `architectures` it reads; the first is written
    config_from_dict: Callable[[dict[str, Any]], Any]  # inverse of `dataclasses.asdict` (checkpoint meta)
    from_hf_config: Callable[[dict[str, Any]], Any]  # config.json -> our config
    to_hf_config: Callable[..., dict[str, Any]]  # our config (, torch_dtype) -> config.json
    get_preset: Callable[[str], Any]  # a named random-init config
    with_overrides: Callable[[Any, dict[str, Any]], Any]  # dotted overrides, validated
    model_class: Callable[..., VisionLanguageModel]  # model_class(cfg, *, rngs, dtype, param_dtype)
    layout: ModuleType  # the HF <-> ours parameter table and its helpers (see `models/qwen2_5_vl/params.py`)
    processor: Processor  # images, prompt template and prompt batches (models/processor.py)
    # Analytic costs for `vlmr1 plan` (a module with `param_counts(cfg, lora_rank)` and `flops(cfg, batch, ...)`, see
    # `models/qwen2_5_vl/costs.py`); None: the plan counts the abstract parameters and reports no FLOP estimate.
    costs: ModuleType | None = None
    # What a release's config.json lacks for the family's readers (`vlmr1 check-export`); [] when nothing.
    hf_config_problems: Callable[[dict[str, Any]], list[str]] = lambda raw: []


_registry: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make `family` available by name (a second family under the same name is an error)."""
    known = _registry.get(family.name)
    if known is not None and known is not family:
        raise ValueError(f"model family {family.name!r} is already registered")
    _registry[family.name] = family
    return family


def _load_builtin(name: str) -> None:
    if name in BUILTIN_FAMILIES and name not in _registry:
        register_family(importlib.import_module(BUILTIN_FAMILIES[name]).FAMILY)


def family_names() -> list[str]:
    return sorted({*BUILTIN_FAMILIES, *_registry})


def get_family(name: str) -> ModelFamily:
    """The family registered as `name` (`model.family` in a recipe)."""
    _load_builtin(name)
    try:
        return _registry[name]
    except KeyError:
        raise ValueError(f"model.family={name!r}: unknown model family; choose one of {family_names()}") from None


def family_of(cfg: Any) -> ModelFamily:
    """The family of a model config (every family's config has a `family` field naming it)."""
    return get_family(cfg.family)


def family_for_hf_config(hf_config: dict[str, Any], where: str = "config.json") -> ModelFamily:
    """The family whose `architectures` include the first one `hf_config` names."""
    for name in BUILTIN_FAMILIES:
        _load_builtin(name)
    architectures: Sequence[str] = hf_config.get("architectures") or []
    for family in _registry.values():
        if any(a in family.architectures for a in architectures):
            return family
    known = sorted(a for f in _registry.values() for a in f.architectures)
    raise ValueError(f"{where}: architectures {list(architectures)} is not a model family vlmr1-jax knows ({known})")


def processor_of(cfg: Any) -> Processor:
    """The processor of a model of config `cfg`: its family's, for its sizes (e.g. InternVL's tile size)."""
    return family_of(cfg).processor.for_config(cfg)


def config_from_hf(hf_config: dict[str, Any], where: str = "config.json") -> Any:
    """Our config of an HF `config.json`, by the family its `architectures` name."""
    return family_for_hf_config(hf_config, where).from_hf_config(hf_config)


def config_from_dict(data: dict[str, Any]) -> Any:
    """A config saved as `dataclasses.asdict` (checkpoint meta); older metas without `family` are Qwen2.5-VL."""
    return get_family(data.get("family", "qwen2_5_vl")).config_from_dict(data)
