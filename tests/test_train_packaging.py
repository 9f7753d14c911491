"""Packaging: the trainer runs from a non-editable install, names its extra when it is missing,
and the project ships its license.

The install test builds the wheel with pip (which fetches the build backend, setuptools, into
an isolated build environment) and installs it with ``--no-deps --target`` into a temporary
folder; the commands then run from another directory with only that folder on ``PYTHONPATH``
(the dependencies come from this interpreter's environment). It is slow (a build and a short
training run) and skipped where pip cannot build.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
import train_testing

ROOT = train_testing.ROOT


def _run(command: list[str], cwd: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
  environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  environment.update(JAX_PLATFORMS="cpu", **env)
  return subprocess.run(
    command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600
  )


def test_cli_without_the_train_extra_names_it(tmp_path):
  # The core install (no extras) has jax but none of the trainer's packages.
  blocked = ["yaml", "flax", "optax", "orbax", "grain", "tokenizers", "tensorboardX", "tqdm"]
  code = (
    "import sys\n"
    f"for name in {blocked!r}: sys.modules[name] = None\n"
    "from train import cli\n"
    "sys.exit(cli.main(['--help']))\n"
  )
  run = _run([sys.executable, "-c", code], tmp_path, PYTHONPATH=str(ROOT))
  assert run.returncode == 2, run.stdout + run.stderr
  assert run.stderr.startswith("the trainer needs the 'train' extra (missing module ")
  assert "pip install 'cce-jax[train]'" in run.stderr
  assert len(run.stderr.strip().splitlines()) == 1 and run.stdout == ""


def test_license_is_apache_2():
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert project["license"] == {"text": "Apache-2.0"}
  assert "tensorboard" in project["optional-dependencies"]
  assert project["scripts"]["cce-train"] == "train.cli:main"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
  """The project installed, not editable, into a temporary folder (its ``bin/`` too)."""
  target = tmp_path_factory.mktemp("site")
  build = _run(
    [
      sys.executable,
      "-m",
      "pip",
      "install",
      "--quiet",
      "--no-deps",
      "--target",
      str(target),
      str(ROOT),
    ],
    tmp_path_factory.getbasetemp(),
  )
  if build.returncode != 0:
    pytest.skip(f"pip could not build the wheel here: {build.stderr.strip()[-300:]}")
  return target


@pytest.mark.slow
def test_non_editable_install_runs_from_another_directory(installed, tmp_path_factory):
  elsewhere = tmp_path_factory.mktemp("elsewhere")
  env = {"PYTHONPATH": str(installed)}
  where = _run([sys.executable, "-c", "import train; print(train.__file__)"], elsewhere, **env)
  assert where.stdout.strip() == str(installed / "train" / "__init__.py"), where.stderr
  assert not (installed / "configs").exists()  # no config file ships: the defaults are it

  for command in (
    [sys.executable, "-m", "train", "--help"],
    [str(installed / "bin" / "cce-train"), "--help"],
    [sys.executable, "-m", "train.aot", "--help"],
    [sys.executable, "-m", "train.data.prepare", "--help"],
  ):
    run = _run(command, elsewhere, **env)
    assert run.returncode == 0 and "usage:" in run.stdout, (command, run.stderr[-2000:])

  # The default run (no config file anywhere) at two steps, on the tests' small data.
  cache = tmp_path_factory.getbasetemp() / "packaging_data"
  args = [
    f"workdir={elsewhere / 'run'}",
    f"data.cache_dir={cache}",
    *train_testing.DATA,
    "seq_len=32",
    "steps=2",
    "log_every=1",
    "eval_every=0",
    "tensorboard=false",
    "plot=false",
  ]
  run = _run([str(installed / "bin" / "cce-train"), *args], elsewhere, **env)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "step 2/2 loss" in run.stdout and "step 2: loss" in run.stdout
  assert "vocabulary 8192" in run.stdout and "1.5M parameters" in run.stdout
