"""Nonsense config values are refused when the recipe is read, naming the field, before anything is built; the CLI
turns user errors into one `error:` line (no traceback) and exit code 2."""

from __future__ import annotations

import pytest

from vlmr1_jax.cli import main
from vlmr1_jax.config import load_config


@pytest.mark.parametrize(
    "override, field",
    [
        ("grpo.num_iterations=0", "grpo.num_iterations"),
        ("sampling.max_new_tokens=0", "sampling.max_new_tokens"),
        ("data.prompts_per_step=0", "data.prompts_per_step"),
        ("sampling.temperature=0", "sampling.temperature"),
        ("sampling.top_p=0", "sampling.top_p"),
        ("optim.learning_rate=-1", "optim.learning_rate"),
        ("optim.learning_rate=.nan", "optim.learning_rate"),
        ("optim.grad_accum=0", "optim.grad_accum"),
        ("optim.schedule=cosine", "optim.schedule"),
        ("data.task_type=bogus", "data.task_type"),
        ("data.on_error=ignore", "data.on_error"),
        ("data.max_pixels=10", "data.max_pixels"),
        ("grpo.beta=-0.1", "grpo.beta"),
        ("grpo.epsilon=0", "grpo.epsilon"),
        ("lora.rank=0", "lora.rank"),
        ("lora.dropout=1", "lora.dropout"),
        ("train.trainable=half", "train.trainable"),
        ("train.save_every=0", "train.save_every"),
        ("model.dtype=float64", "model.dtype"),
        ("model.remat=some", "model.remat"),
        ("mesh.fsdp=0", "mesh.fsdp"),
    ],
)
def test_nonsense_values_name_their_field(override, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        load_config("demo_tiny", [override])


def test_sensible_edge_values_pass():
    cfg = load_config(
        "demo_tiny",
        [
            "sampling.temperature=0",
            "sampling.greedy=true",
            "grpo.beta=0",
            "data.task_type=Find {Question} now",
            "optim.learning_rate=0",
        ],
    )
    assert cfg.sampling.greedy and cfg.grpo.beta == 0


def test_nested_and_dotted_model_overrides_are_the_same():
    nested = load_config("demo_tiny", ["model.overrides.text.vocab_size=512"])
    dotted = load_config("demo_tiny", ["model.overrides={'text.vocab_size': 512}"])
    assert nested.model.overrides == dotted.model.overrides == {"text.vocab_size": 512}


def test_cli_prints_one_error_line(capsys):
    assert main(["train", "demo_tiny", "grpo.num_iterations=0"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "error: grpo.num_iterations=0: expected an integer >= 1"
    assert "Traceback" not in err


def test_cli_debug_shows_the_traceback():
    with pytest.raises(ValueError, match=r"grpo\.num_iterations"):
        main(["--debug", "train", "demo_tiny", "grpo.num_iterations=0"])
