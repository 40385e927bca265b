"""Optional dependencies: the `torch` extra (torch, transformers) that only the reference / torch-side commands use."""

from __future__ import annotations

import importlib.util

TORCH_EXTRA = ("torch", "transformers")


class MissingExtraError(ImportError):
    """An optional dependency a command needs is not installed; the message names the extra that provides it."""


def require_torch_extra(purpose: str) -> None:
    """Raise one clear `MissingExtraError` when `purpose` (a command or option) runs without the `torch` extra."""
    missing = [name for name in TORCH_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"{purpose} needs {' and '.join(missing)}, which the core install leaves out: "
            "pip install 'vlmr1-jax[torch]'"
        )
