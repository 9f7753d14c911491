"""The code is formatted: ``ruff format --check`` with the settings in pyproject.toml (2-space
indentation, lines of 100). Skipped where ruff is not installed (it is in the ``test`` extra)."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _ruff() -> str | None:
  """The ruff executable: the ``ruff`` package's own binary, else ``ruff`` on PATH."""
  if importlib.util.find_spec("ruff") is not None:
    from ruff.__main__ import find_ruff_bin

    try:
      return str(find_ruff_bin())
    except FileNotFoundError:
      pass
  return shutil.which("ruff")


def test_code_is_ruff_formatted():
  ruff = _ruff()
  if ruff is None:
    pytest.skip("ruff is not installed (pip install -e '.[test]')")
  result = subprocess.run(
    [ruff, "format", "--check", "--diff", "."],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  summary = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
  assert result.returncode == 0, (
    f"`ruff format --check` failed: {summary[0]}; run `ruff format .` to fix.\n"
    + result.stdout[-4000:]
  )


def test_code_passes_ruff_check():
  """``ruff check`` with the rules selected in pyproject.toml: imports sorted, no unused names,
  no lines over 100 characters, exceptions chained."""
  ruff = _ruff()
  if ruff is None:
    pytest.skip("ruff is not installed (pip install -e '.[test]')")
  result = subprocess.run(
    [ruff, "check", "--output-format", "concise", "."],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 0, (
    "`ruff check` failed; run `ruff check --fix .` and fix the rest by hand.\n"
    + result.stdout[-4000:]
  )
