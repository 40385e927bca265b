"""One dtype vocabulary (`vlmr1_jax.dtypes`): every --dtype option takes the short and the long spelling and
hands the command the long one; anything else is one argparse error listing the choices."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from vlmr1_jax.cli import build_parser
from vlmr1_jax.dtypes import canonical_dtype, dtype_info

SPELLINGS = {
    "bf16": "bfloat16",
    "BFloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    " float32 ": "float32",
}


def test_canonical_names_and_formats():
    for spelling, name in SPELLINGS.items():
        assert canonical_dtype(spelling) == name
    assert (dtype_info("bf16").safetensors, np.dtype(dtype_info("bf16").numpy)) == ("BF16", ml_dtypes.bfloat16)
    assert (dtype_info("fp16").safetensors, np.dtype(dtype_info("fp16").numpy)) == ("F16", np.float16)
    assert (dtype_info("float32").safetensors, np.dtype(dtype_info("float32").numpy)) == ("F32", np.float32)
    with pytest.raises(
        ValueError,
        match=r"model\.dtype='int8': unknown dtype; choose one of bfloat16, float16, "
        r"float32 \(or bf16, fp16, fp32\)",
    ):
        canonical_dtype("int8", "model.dtype")


# Each command with a dtype option: (argv before the option, option, attribute).
COMMANDS = [
    (["export", "SRC", "--out", "OUT"], "--dtype", "dtype"),
    (["import-hf", "--model", "M", "--out", "OUT"], "--param-dtype", "param_dtype"),
    (["check-export", "DIR", "--target", "hf"], "--forward-dtype", "forward_dtype"),
    (["infer", "--model", "M", "--prompt", "P"], "--dtype", "dtype"),
    (["eval", "rec", "--model", "M", "--data", "D", "--image-root", "I"], "--dtype", "dtype"),
    (["check-parity", "--hf-model", "M"], "--dtype", "dtype"),
]


@pytest.mark.parametrize("argv,option,attr", COMMANDS, ids=[c[0][0] for c in COMMANDS])
def test_every_dtype_option_speaks_the_vocabulary(argv, option, attr, capsys):
    parser = build_parser()
    for spelling, name in (("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp32", "float32")):
        assert getattr(parser.parse_args([*argv, option, spelling]), attr) == name
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, option, "bf17"])
    assert f"argument {option}: 'bf17' is not a dtype; choose one of bfloat16" in capsys.readouterr().err


def test_a_known_dtype_outside_a_commands_choices_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["import-hf", "--model", "M", "--out", "O", "--param-dtype", "fp16"])
    assert "invalid choice: 'float16'" in capsys.readouterr().err
