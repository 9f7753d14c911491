"""scripts/jax_matrix.sh without building a venv: shellcheck, arguments, the Python each JAX
version gets, a missing Python, and the run and summary over fake venvs."""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import subprocess

import pytest
from gcp_testing import shellcheck

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "jax_matrix.sh"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [shutil.which("bash"), str(SCRIPT), *args],
    capture_output=True,
    text=True,
    env={**os.environ, **(env or {})},
    timeout=60,
  )


def _fake_venv(matrix_dir: pathlib.Path, version: str, pytest_output: str, status: int) -> None:
  """DIR/jax-VERSION/bin/python answering what the script asks: jax's version, its own
  version, and ``-m pytest ...`` (printing ``pytest_output`` and the arguments, exiting
  ``status``)."""
  python = matrix_dir / f"jax-{version}" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text(
    "#!/usr/bin/env bash\n"
    f'if [[ "$1" == "-c" ]]; then echo {version}; exit 0; fi\n'
    'if [[ "$1" == "--version" ]]; then echo "Python 3.12.1"; exit 0; fi\n'
    f'echo "args: $* PYTHONPATH=$PYTHONPATH"; echo "{pytest_output}"; exit {status}\n'
  )
  python.chmod(python.stat().st_mode | stat.S_IEXEC)


def test_shellcheck_clean():
  result = subprocess.run([shellcheck(), str(SCRIPT)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_help_and_a_bad_argument():
  shown = _run("--help")
  assert shown.returncode == 0
  assert "scripts/jax_matrix.sh 0.11.2" in shown.stdout and "set -e" not in shown.stdout
  bad = _run("latest")
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
    "jax_matrix: unknown argument 'latest'; pass JAX versions (e.g. 0.11.2), --build-only, "
    "or pytest arguments after --"
  ]


@pytest.mark.parametrize(
  "version, python", [("0.10.2", "3.11"), ("0.11.2", "3.12"), ("0.12.0.1", "3.12")]
)
def test_each_jax_version_gets_the_python_it_needs(version, python):
  result = subprocess.run(
    ["bash", "-c", f'source "{SCRIPT}"; python_for_jax {version}'],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.stdout.strip() == python


def test_a_missing_python_is_one_line_naming_the_fix(tmp_path):
  tools = tmp_path / "bin"  # the coreutils the script needs, and no python
  tools.mkdir()
  for tool in ("dirname", "mkdir", "tail", "sed", "rm"):
    (tools / tool).symlink_to(shutil.which(tool))
  result = _run(
    "--build-only",
    "0.11.2",
    env={"PATH": str(tools), "HOME": str(tmp_path), "CCE_JAX_MATRIX_DIR": str(tmp_path / "matrix")},
  )
  assert result.returncode == 1
  assert (
    f"jax_matrix: no working python3.12 on PATH or under {tmp_path}/.pyenv/versions; "
    "install it (e.g. 'pyenv install 3.12') and rerun"
  ) in result.stderr
  assert result.stdout == "jax 0.11.2: venv build failed\n"


def test_runs_the_suite_in_each_venv_and_summarises(tmp_path):
  matrix = tmp_path / "matrix"
  _fake_venv(matrix, "0.11.2", "5 passed in 1.00s", 0)
  _fake_venv(matrix, "0.12.0.1", "1 failed, 4 passed in 1.00s", 1)
  result = _run(
    "0.11.2",
    "0.12.0.1",
    "--",
    "-x",
    "tests/test_readme.py",
    env={"CCE_JAX_MATRIX_DIR": str(matrix)},
  )
  assert result.returncode == 1
  log = matrix / "jax-0.12.0.1.log"
  assert result.stdout.splitlines() == [
    "jax 0.11.2 (Python 3.12.1): 5 passed in 1.00s",
    f"jax 0.12.0.1 (Python 3.12.1): FAILED: 1 failed, 4 passed in 1.00s (see {log})",
  ]
  # pytest ran with the arguments after --, on this checkout's code.
  first = (matrix / "jax-0.11.2.log").read_text().splitlines()[0]
  assert first.startswith(f"args: -m pytest -x tests/test_readme.py PYTHONPATH={ROOT}")
