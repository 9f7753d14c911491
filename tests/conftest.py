"""Shared test configuration: the --runslow switch and numeric helpers."""

from __future__ import annotations

import os

import numpy as np

# tests/multidevice/ needs 8 host devices; tests/test_multidevice.py runs it in a subprocess.
collect_ignore = [] if os.environ.get("CCE_JAX_MULTIDEVICE") else ["multidevice"]


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
  """Without --runslow, tests marked slow are deselected (reported as such, not run)."""
  if config.getoption("--runslow"):
    return
  slow = [item for item in items if "slow" in item.keywords]
  if slow:
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if "slow" not in item.keywords]


def relative_error(actual, expected) -> float:
  """||actual - expected|| / ||expected|| in float64 (absolute when expected is 0)."""
  actual = np.asarray(actual, dtype=np.float64)
  expected = np.asarray(expected, dtype=np.float64)
  scale = np.linalg.norm(expected)
  diff = np.linalg.norm(actual - expected)
  return float(diff / scale) if scale > 0 else float(diff)


def assert_rel_close(name: str, actual, expected, tol: float) -> None:
  """Asserts a finite ``actual`` within ``tol`` relative (norm) error of ``expected``."""
  actual = np.asarray(actual, dtype=np.float64)
  assert actual.shape == np.shape(expected), f"{name}: shape {actual.shape} != {np.shape(expected)}"
  assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
  err = relative_error(actual, expected)
  assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"
