"""The guard of the `npu` tests."""

from __future__ import annotations

import pytest


def require_npu() -> None:
    """Skip unless torch_npu imports (with CANN) and sees a device."""
    try:
        pytest.importorskip("torch_npu", exc_type=ImportError)
    except (OSError, RuntimeError) as e:
        pytest.skip(f"torch_npu does not import: {e}")
    import torch

    if not torch.npu.is_available():
        pytest.skip("torch.npu.is_available() is False")
