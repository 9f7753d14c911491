"""Runs tests/multidevice/ in a subprocess on 8 forced CPU devices.

The number of host devices is fixed when the XLA backend starts, so the multi-device tests get
their own interpreter with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``; this file
runs them there, one subprocess per file (so that pytest-xdist spreads them over its
workers), and reports their output. ``--runslow`` is passed on.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
FILES = sorted(path.name for path in (HERE / "multidevice").glob("test_*.py"))


@pytest.mark.parametrize("file", FILES)
def test_multidevice_suite(request, file):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["CCE_JAX_MULTIDEVICE"] = "1"
  command = [
    sys.executable,
    "-m",
    "pytest",
    "-q",
    "-p",
    "no:cacheprovider",
    str(HERE / "multidevice" / file),
  ]
  if request.config.getoption("--runslow"):
    command.append("--runslow")
  run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=HERE.parent)
  assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
