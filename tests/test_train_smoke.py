"""Smoke test of the trainer: a few steps of configs/default.yaml at tiny size, then its files."""

from __future__ import annotations

import json
import math

import pytest
import train_testing

from train import cli


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  with train_testing.use_compilation_cache(base / "jax_cache"):
    yield base / "data_cache", base / "jax_cache"


def test_default_config_at_tiny_size(paths, tmp_path, capsys):
  cache_dir, _ = paths
  workdir = tmp_path / "run"
  args = train_testing.overrides(
      workdir, cache_dir, "steps=8", "log_every=2", "eval_every=4", "eval_batches=2",
      "checkpoint_every=4", "tensorboard=true", "plot=true", "optim.learning_rate=1e-2")
  assert cli.main(args) == 0
  assert "step 8: loss" in capsys.readouterr().out

  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4, 6, 8]
  for record in records:
    assert math.isfinite(record["loss"]) and record["loss"] > 0
    assert {"learning_rate", "grad_norm", "tokens_per_s", "step_time_s"} <= set(record)
  assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]
  losses = [r["loss"] for r in records]
  assert losses[-1] < losses[0] - 0.2, losses  # from ln(8192) = 9.0 the loss falls fast

  checkpoints = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  assert checkpoints == [4, 8]
  for step in checkpoints:
    assert (workdir / "checkpoints" / str(step) / "state").is_dir()
    assert (workdir / "checkpoints" / str(step) / "data" / "process_0-of-1.json").is_file()
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "loss.png").stat().st_size > 0
  assert "loss_impl: cce" in (workdir / "config.yaml").read_text()


def test_finished_run_resumes_to_nothing(paths, tmp_path):
  """A workdir whose run is complete: the trainer restores the last step and stops."""
  cache_dir, _ = paths
  args = train_testing.overrides(tmp_path, cache_dir, "steps=3", "checkpoint_every=3")
  first = train_testing.train(args)
  again = train_testing.train(args)
  assert (first.start_step, first.step) == (0, 3)
  assert (again.start_step, again.step) == (3, 3)
  assert train_testing.losses(tmp_path) == {1: first.history[0]["loss"],
                                            2: first.history[1]["loss"],
                                            3: first.history[2]["loss"]}
