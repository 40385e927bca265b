"""Release targets and the weight dtypes each accepts (the default first)."""

from __future__ import annotations

from vlmr1_jax.dtypes import canonical_dtype

# 300I Duo (310P) has no bf16 (docs/facts.md: vllm-ascend).
TARGETS: dict[str, tuple[str, ...]] = {
    "hf": ("bfloat16", "float16", "float32"),
    "ascend-a2": ("bfloat16", "float32"),
    "ascend-310p": ("float16",),
}


def check_target(target: str) -> tuple[str, ...]:
    """The dtypes `target` allows; ValueError naming the known targets for an unknown one."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {sorted(TARGETS)}")
    return TARGETS[target]


def resolve_dtype(target: str, dtype: str | None) -> str:
    """The canonical release dtype for `target`: its default when `dtype` is None; ValueError if not allowed."""
    allowed = check_target(target)
    if dtype is None:
        return allowed[0]
    dtype = canonical_dtype(dtype)
    if dtype not in allowed:
        why = " (Atlas 300I Duo / 310P supports only float16)" if target == "ascend-310p" else ""
        raise ValueError(f"dtype {dtype!r} is not allowed for target {target}{why}; allowed: {', '.join(allowed)}")
    return dtype
