"""Smoke test of the trainer: configs/default.yaml at tiny size through the CLI, then its files."""

from __future__ import annotations

import json
import math

import pytest
import train_testing

from train import cli


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  with train_testing.session(tmp_path_factory) as base:
    yield base


def test_default_config_at_tiny_size(base, tmp_path, capsys):
  workdir = tmp_path / "run"
  steps = train_testing.REFERENCE_STEPS  # 24: the same program as the reference run
  args = train_testing.overrides(
    workdir,
    base / "data_cache",
    f"steps={steps}",
    "log_every=4",
    "eval_every=12",
    "eval_batches=2",
    "checkpoint_every=12",
    "tensorboard=true",
    "plot=true",
  )
  assert cli.main(args) == 0
  assert f"step {steps}: loss" in capsys.readouterr().out

  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(4, steps + 1, 4))
  for record in records:
    assert math.isfinite(record["loss"]) and record["loss"] > 0
    assert {"learning_rate", "grad_norm", "tokens_per_s", "step_time_s", "eta_s"} <= set(record)
    assert "mfu" not in record  # the CPU has no peak FLOP/s in train/hardware.py
  assert [r["step"] for r in records if "eval_loss" in r] == [12, 24]
  for record in (r for r in records if "eval_loss" in r):  # cce_jax.token_stats
    assert 0.0 <= record["eval_accuracy"] <= 1.0
    assert 0.0 < record["eval_entropy"] <= math.log(train_testing.VOCAB) + 1e-3
  losses = [r["loss"] for r in records]
  assert losses[-1] < losses[0] - 0.3, losses  # from ln(8192) = 9.0

  checkpoints = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  assert checkpoints == [12, 24]
  for step in checkpoints:
    assert (workdir / "checkpoints" / str(step) / "state").is_dir()
    assert (workdir / "checkpoints" / str(step) / "data" / "process_0-of-1.json").is_file()
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "loss.png").stat().st_size > 0
  assert "loss_impl: cce" in (workdir / "config.yaml").read_text()

  # Run again on the finished workdir: nothing to train, nothing changes.
  assert cli.main(args) == 0
  again = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert again == records
