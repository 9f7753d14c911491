"""Shared test configuration: the --runslow switch (helpers live in ``tests/testing.py``)."""

from __future__ import annotations

import os

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
