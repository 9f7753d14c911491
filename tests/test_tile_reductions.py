"""``benchmarks/tile_reductions.py``: the loops it times compute the forwards' statistics, it
prints one row per tile shape, and a bad flag is one line with exit status 2."""

from __future__ import annotations

import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import tile_reductions  # noqa: E402


def _logits(rng: np.random.Generator, n: int, v: int, tiles: int) -> np.ndarray:
  return rng.normal(size=(n, tiles * v)) * 3.0  # (n, tiles * v) float64


def test_reduction_loops_compute_lse_entropy_and_argmax():
  """Over a stack of two ragged tiles, the loss loop gives the float64 log-sum-exp and the
  token_stats loop the float64 entropy and the first argmax: the timed work is the real one."""
  rng = np.random.default_rng(7)
  n, v = 37, 53  # a multiple of no tile size
  z = _logits(rng, n, v, 2)
  z_tiles = jnp.asarray(z.reshape(n, 2, v).transpose(1, 0, 2), jnp.float32)  # (2, n, v)
  lse64 = np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), 1)) + z.max(1)
  p64 = np.exp(z - lse64[:, None])
  entropy64 = -np.sum(p64 * np.log(p64), 1)

  loss_fn, loss_init = tile_reductions.REDUCTIONS["loss"]
  running_max, running_sum = tile_reductions.reduction_loop(loss_fn, loss_init, 2)(z_tiles)
  np.testing.assert_allclose(running_max + np.log(running_sum), lse64, rtol=1e-5)

  stats_fn, stats_init = tile_reductions.REDUCTIONS["token_stats"]
  peak, s, t, argmax = tile_reductions.reduction_loop(stats_fn, stats_init, 2)(z_tiles)
  np.testing.assert_allclose(np.log(s) - t / s, entropy64, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(argmax), np.argmax(z, 1))
  np.testing.assert_allclose(peak, z.max(1), rtol=1e-6)


def test_product_loop_is_the_running_max_of_the_logits():
  rng = np.random.default_rng(3)
  e = rng.normal(size=(19, 24)).astype(np.float32)
  c = rng.normal(size=(3 * 40, 24)).astype(np.float32)
  got = tile_reductions.product_loop(40, upcast=False)(jnp.asarray(e), jnp.asarray(c))
  np.testing.assert_allclose(got, (e.astype(np.float64) @ c.T).max(1), rtol=1e-5)


def test_prints_one_row_per_tile_shape(capsys):
  args = ["--tiles-nv", "16x40,24x8", "--hidden", "24", "--tiles", "3", "--repeats", "1"]
  assert tile_reductions.main(args) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
  assert [row.split(" | ")[0] for row in rows] == ["16x40", "24x8"]
  for row in rows:
    cells = [float(cell) for cell in row.split(" | ")[1:]]
    assert len(cells) == 4 and all(value > 0 for value in cells)


@pytest.mark.parametrize(
  ("flags", "named"),
  [
    (["--tiles-nv", "2048"], "--tiles-nv"),
    (["--tiles-nv", "0x512"], "--tiles-nv"),
    (["--tiles", "0"], "--tiles"),
  ],
)
def test_bad_flags_are_one_line_exit_2(flags, named, capsys):
  with pytest.raises(SystemExit) as exit_info:
    tile_reductions.main(flags)
  assert exit_info.value.code == 2
  error_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
  assert len(error_lines) == 1 and named in error_lines[0]
