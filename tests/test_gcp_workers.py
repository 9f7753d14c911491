"""The command lines the gcp/ scripts build really start a multi-host training run: the worker
command of gcp/launch.sh, and gcp/slurm_train.sbatch under a fake ``srun``, each run here as two
CPU processes ("workers" / tasks) joined by ``jax.distributed.initialize`` on 127.0.0.1."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

import pytest
import train_testing
from gcp_testing import ROOT, fake_venv, install_fake, run_script, write_env

STEPS = 4
TIMEOUT = 600.0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  with train_testing.session(tmp_path_factory) as base:
    yield base


def _tiny_run(base: pathlib.Path, workdir: pathlib.Path) -> list[str]:
  """Overrides of the tests' tiny run in ``workdir``, checkpointing at its end."""
  return train_testing.overrides(
    workdir, base / "data_cache", f"steps={STEPS}", f"checkpoint_every={STEPS}"
  )


def _cpu_env(base: pathlib.Path, port: int) -> dict[str, str]:
  return {
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": train_testing.FAST_COMPILE,
    "JAX_NUM_PROCESSES": "2",
    "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
    **train_testing.cache_env(base / "jax_cache"),
  }


def _assert_trained(workdir: pathlib.Path, output: str) -> None:
  assert f"step {STEPS}: loss" in output, output[-3000:]
  assert sorted(train_testing.losses(workdir)) == list(range(1, STEPS + 1))
  assert (workdir / "checkpoints" / str(STEPS)).is_dir()


def _wait_for_files(paths: list[pathlib.Path], pids: list[pathlib.Path]) -> None:
  deadline = time.monotonic() + TIMEOUT
  while not all(p.exists() for p in paths):
    if time.monotonic() > deadline:
      for pid in pids:
        if pid.exists():
          os.kill(int(pid.read_text()), signal.SIGKILL)
      raise AssertionError(f"workers did not finish in {TIMEOUT} s")
    time.sleep(0.2)


def test_launch_worker_command_starts_a_two_host_run(base, tmp_path):
  workdir = tmp_path / "run"
  env_file = write_env(
    tmp_path,
    ACCELERATOR_TYPE="v5p-16",
    REMOTE_DIR=str(ROOT),
    REMOTE_VENV=str(fake_venv(tmp_path / "venv")),
    CONFIG="configs/default.yaml",
    WORKDIR=str(workdir),
    TRAIN_ARGS=" ".join(_tiny_run(base, workdir)),
  )
  result = run_script("launch.sh", "--env", str(env_file), "--print-worker-command")
  assert result.returncode == 0, result.stderr
  command = result.stdout.strip()
  assert "distributed=on" in command  # v5p-16: two hosts

  port = train_testing.free_port()
  homes = [tmp_path / f"worker{i}" for i in range(2)]
  for process_id, home in enumerate(homes):  # each worker runs it in its home directory
    home.mkdir()
    env = dict(os.environ, JAX_PROCESS_ID=str(process_id), **_cpu_env(base, port))
    started = subprocess.run(
      ["bash", "-c", command], cwd=home, env=env, capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 0, started.stderr
    assert "trainer started" in started.stdout
  logs = [home / "cce_jax_logs" for home in homes]
  again = subprocess.run(["bash", "-c", command], cwd=homes[0], capture_output=True, text=True)
  assert again.returncode == 1 and "already running" in again.stderr

  _wait_for_files([log / "exit_status" for log in logs], [log / "train.pid" for log in logs])
  outputs = [(log / "train.log").read_text() for log in logs]
  for log, output in zip(logs, outputs, strict=True):
    assert (log / "exit_status").read_text().strip() == "0", output[-3000:]
    assert "launching cce_jax" in output
  _assert_trained(workdir, outputs[0])
  assert "step 4: loss" not in outputs[1]  # process 0 alone reports


def test_slurm_sbatch_starts_one_process_per_task(base, tmp_path):
  bin_dir = tmp_path / "bin"
  install_fake(bin_dir, "srun", "fake_slurm.py", "srun")
  install_fake(bin_dir, "scontrol", "fake_slurm.py", "scontrol")
  workdir, logs = tmp_path / "run", tmp_path / "logs"
  env = dict(os.environ, **_cpu_env(base, 0))
  for name in ["JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"]:
    env.pop(name)  # the script sets them
  env.update(
    PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
    SLURM_JOB_ID="77",
    SLURM_JOB_NODELIST="node[1-2]",
    SLURM_NTASKS="2",
    FAKE_SLURM_NODES="2",
    REPO_DIR=str(ROOT),
    VENV=str(fake_venv(tmp_path / "venv")),
    LOG_DIR=str(logs),
    CONFIG="configs/default.yaml",
    WORKDIR=str(workdir),
    COORDINATOR_PORT=str(train_testing.free_port()),
  )
  script = str(ROOT / "gcp" / "slurm_train.sbatch")
  dry = subprocess.run(["bash", script, "--dry-run"], env=env, capture_output=True, text=True)
  assert dry.returncode == 0, dry.stderr
  assert "JAX_COORDINATOR_ADDRESS=localhost:" in dry.stdout and "JAX_NUM_PROCESSES=2" in dry.stdout

  result = subprocess.run(
    ["bash", script, *_tiny_run(base, workdir)],
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
  )
  task_logs = [logs / f"77-task-{task}.log" for task in range(2)]
  outputs = [log.read_text() if log.exists() else "" for log in task_logs]
  assert result.returncode == 0, result.stderr + "".join(o[-3000:] for o in outputs)
  _assert_trained(workdir, outputs[0])
