"""``benchmarks/speed.py``'s goal checks on hand-made timings: the verdict on the ratio of the
medians, and the per-round ratios of adjacent calls printed beside it."""

from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import speed  # noqa: E402


def _row(impl: str, loss_ms: list[float], grad_ms: list[float], base_grad_ms: float) -> dict:
  loss_median, grad_median = sorted(loss_ms)[1], sorted(grad_ms)[1]
  return {
    "shape": "8x4x16",
    "dtype": "f32",
    "distribution": "trained",
    "impl": impl,
    "loss_times_ms": loss_ms,
    "loss_grad_times_ms": grad_ms,
    "loss_ms": loss_median,
    "loss_grad_ms": grad_median,
    "ratio_vs_baseline": grad_median / base_grad_ms,
    "ratio_vs_jax_cce": None,
  }


def test_goals_judge_the_medians_and_carry_each_rounds_ratio():
  base_grad = [100.0, 200.0, 120.0]  # the machine slowed down in round 2
  rows = [
    _row("baseline", [50.0, 100.0, 60.0], base_grad, 120.0),
    _row("xla", [40.0, 80.0, 50.0], [130.0, 260.0, 150.0], 120.0),
    _row("xla-stats", [42.0, 76.0, 55.0], [0.0, 0.0, 0.0], 120.0),
    _row("xla-gif", [40.0, 80.0, 50.0], [85.0, 170.0, 110.0], 120.0),
  ]
  goals = {goal["goal"].split(" (")[0]: goal for goal in speed.check_goals(rows)}

  stats = goals["forward xla-stats/xla loss <= 1.0"]
  assert stats["value"] == pytest.approx(55.0 / 50.0) and not stats["passed"]
  assert stats["rounds"] == pytest.approx([42 / 40, 76 / 80, 55 / 50])

  gif = goals["loss+grad xla-gif/baseline <= 0.9"]
  assert gif["value"] == pytest.approx(110.0 / 120.0) and not gif["passed"]
  assert gif["rounds"] == pytest.approx([0.85, 0.85, 110 / 120])
  assert gif["floor"] is None  # no products row in this run


def test_per_round_ratios_need_the_same_rounds():
  with pytest.raises(ValueError):
    speed.per_round_ratios({"t": [1.0, 2.0]}, {"t": [1.0]}, "t")
