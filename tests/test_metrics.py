"""Metrics JSONL + TensorBoard, window means, rollout log, and `vlmr1 plot` PNGs."""

from __future__ import annotations

import argparse
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from vlmr1_jax.cli.plot import register
from vlmr1_jax.train.metrics import MetricsWriter, RolloutLog, mean_metrics, read_metrics
from vlmr1_jax.train.plot import plot_run


def tb_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
    """Decode TFRecord event files by hand: u64 length, u32 crc, payload, u32 crc."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_writer_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"reward": 0.5, "rewards/accuracy": np.float32(0.25), "kl": jnp.asarray(0.125)})
        writer.write(2, {"reward": 0.75, "loss": float("nan")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"step": 1, "reward": 0.5, "rewards/accuracy": 0.25, "kl": 0.125},
        {"step": 2, "reward": 0.75, "loss": None},
    ]
    scalars = tb_scalars(tmp_path / "tb")
    assert scalars["reward"] == [(1, 0.5), (2, 0.75)]
    assert scalars["rewards/accuracy"] == [(1, 0.25)]
    assert np.isnan(scalars["loss"][0][1])


def test_only_process_zero_writes(tmp_path):
    with MetricsWriter(tmp_path / "run", process_index=1) as writer:
        writer.write(1, {"reward": 1.0})
    assert not (tmp_path / "run").exists()


def test_resumed_run_appends_and_reading_keeps_last_record_per_step(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"reward": float(step)})
    with MetricsWriter(tmp_path, tensorboard=False) as writer:  # resumed from a checkpoint at step 2
        writer.write(3, {"reward": 30.0})
        writer.write(4, {"reward": 40.0})
    assert not (tmp_path / "tb").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
    assert [(r["step"], r["reward"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_read_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl does not exist"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no metrics records"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward": 1}\n{"reward": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        read_metrics(tmp_path)


def test_mean_metrics_per_key_over_the_steps_reporting_it():
    window = [{"reward": 1.0, "kl": 2.0}, {"reward": 3.0}, {"reward": None, "kl": 4.0, "loss": np.float32(0.5)}]
    assert mean_metrics(window) == {"reward": 2.0, "kl": 3.0, "loss": 0.5}
    assert mean_metrics([]) == {}


def test_rollout_log_one_line_per_completion(tmp_path):
    with RolloutLog(tmp_path) as log:
        log.write(
            5,
            ["p0", "p1"],
            ["c0", "c1", "c2", "c3"],
            {"accuracy": [1.0, 0.0, np.float32(0.5), 0.0], "format": [1, 1, 0, 1]},
            extra={"solution": ["s0", "s0", "s1", "s1"], "advantage": np.array([0.5, -0.5, 1.0, -1.0])},
        )
        with pytest.raises(ValueError, match="'rewards/format' has 3 values for 4 completions"):
            log.write(6, ["p0", "p1"], ["a", "b", "c", "d"], {"format": [1, 1, 1]})
        with pytest.raises(ValueError, match="3 completions cannot be split into groups for 2 prompts"):
            log.write(6, ["p0", "p1"], ["a", "b", "c"], {})
    rows = [json.loads(x) for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt_index"], r["prompt"], r["completion"]) for r in rows] == [
        (5, 0, "p0", "c0"),
        (5, 0, "p0", "c1"),
        (5, 1, "p1", "c2"),
        (5, 1, "p1", "c3"),
    ]
    assert rows[2]["rewards"] == {"accuracy": 0.5, "format": 0.0}
    assert rows[3]["solution"] == "s1" and rows[3]["advantage"] == -1.0


def write_run(run_dir, steps: int, with_kl: bool = True):
    with MetricsWriter(run_dir, tensorboard=False) as writer:
        for s in range(1, steps + 1):
            metrics = {
                "reward": s / steps,
                "rewards/accuracy": 0.6 * s / steps,
                "rewards/format": 0.4,
                "completion_length": 100.0 - s,
                "loss": 0.01,
            }
            if with_kl:
                metrics["kl"] = 1e-3 * s
            writer.write(s, metrics)


def assert_real_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (700, 400)
        pixels = np.asarray(im.convert("L"))
    assert (pixels < 128).mean() > 0.005  # axes, labels and curves are drawn, not a blank canvas


def test_plot_run_draws_each_panel(tmp_path):
    write_run(tmp_path, 12)
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["reward.png", "kl.png", "completion_length.png"]
    assert all(p.parent == tmp_path / "plots" for p in paths)
    for path in paths:
        assert_real_png(path)


def test_plot_skips_missing_panels_and_errors_without_data(tmp_path):
    write_run(tmp_path / "a", 4, with_kl=False)
    assert [p.name for p in plot_run(tmp_path / "a", tmp_path / "out")] == ["reward.png", "completion_length.png"]
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        plot_run(tmp_path / "missing")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    with pytest.raises(ValueError, match="none of reward"):
        plot_run(tmp_path / "b")


def test_plot_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    write_run(tmp_path / "run", 3)
    args = parser.parse_args(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "png")])
    assert args.func(args) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["completion_length.png", "kl.png", "reward.png"]
    args = parser.parse_args(["plot", str(tmp_path / "nothing")])
    assert args.func(args) == 1
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
