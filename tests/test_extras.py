"""The `torch` extra: commands that need torch / transformers say which extra to install, in one error line."""

from __future__ import annotations

import pytest

from vlmr1_jax.cli import main
from vlmr1_jax.extras import MissingExtraError, require_torch_extra

ABSENT = "vlmr1_no_such_module"  # stands in for an uninstalled torch / transformers


def test_installed_extra_passes_and_a_missing_one_names_the_install(monkeypatch):
    require_torch_extra("anything")  # the test environment has the torch extra
    monkeypatch.setattr("vlmr1_jax.extras.TORCH_EXTRA", ("torch", ABSENT))
    with pytest.raises(MissingExtraError, match=rf"^check-parity needs {ABSENT}, .*pip install 'vlmr1-jax\[torch\]'$"):
        require_torch_extra("check-parity")


def test_torch_backend_without_the_extra_is_one_error_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("vlmr1_jax.extras.TORCH_EXTRA", (ABSENT, "transformers"))
    code = main(["infer", "--model", str(tmp_path), "--prompt", "hi", "--backend", "torch", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: the torch backend needs {ABSENT}") and "pip install 'vlmr1-jax[torch]'" in err
