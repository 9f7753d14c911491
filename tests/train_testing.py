"""Helpers of the trainer tests (tests/test_train_*.py): tiny configs, runs, their losses.

Every run trains on the real default data source (the Python standard library's source) with a
small tokenizer (V = 8192) over the first 1 MB of it, prepared once per test session in a shared
cache directory (subprocesses reuse it), and a tiny model.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental.compilation_cache import compilation_cache

from train import config, data, trainer
from train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
VOCAB = 8192
DATA = ["data.vocab_size=8192", "data.max_corpus_bytes=1000000"]
TINY_MODEL = [
  "model.d_model=32",
  "model.num_layers=2",
  "model.num_heads=4",
  "model.num_kv_heads=2",
  "model.head_dim=8",
  "model.mlp_dim=64",
]
QUIET = ["progress=false", "tensorboard=false", "plot=false"]


def overrides(workdir: pathlib.Path, cache_dir: pathlib.Path, *extra: str) -> list[str]:
  """Command-line overrides of a tiny run in ``workdir`` (later ``extra`` ones win)."""
  return [
    f"workdir={workdir}",
    f"data.cache_dir={cache_dir}",
    *DATA,
    *TINY_MODEL,
    "batch_size=8",
    "seq_len=32",
    "log_every=1",
    "eval_every=0",
    "checkpoint_every=1000",
    "optim.warmup_steps=2",
    *QUIET,
    *extra,
  ]


# XLA flags of trainer subprocesses: compiles faster (fusion, so rounding, may differ).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now (for a jax.distributed coordinator)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


# Steps of the reference run that the resume, sharded and multi-host tests compare with.
REFERENCE_STEPS = 24


@contextlib.contextmanager
def session(tmp_path_factory):
  """Yields the session's base directory with the data prepared and the compilation cache on.

  The data cache is ``<base>/data_cache``, the compilation cache ``<base>/jax_cache``.
  """
  base = tmp_path_factory.getbasetemp()
  with use_compilation_cache(base / "jax_cache"):
    prepare_data(base / "data_cache")
    yield base


def prepare_data(cache_dir: pathlib.Path) -> data.PreparedData:
  """Prepares the tests' data in ``cache_dir`` (cached: later calls return at once)."""
  return data.prepare(config.load(None, [f"data.cache_dir={cache_dir}", *DATA]).data)


def train(args: Sequence[str]) -> trainer.RunResult:
  """Runs the trainer in this process on configs/default.yaml with ``args`` overrides."""
  return trainer.run(config.load(None, list(args)))


@functools.cache
def reference_losses(base: pathlib.Path, steps: int) -> dict[int, float]:
  """Losses of the uninterrupted single-device tiny run of ``steps`` steps (once per session).

  ``base`` is the session's temporary directory (the data cache lives in it).
  """
  workdir = base / f"reference_{steps}"
  train(overrides(workdir, base / "data_cache", f"steps={steps}"))
  return losses(workdir)


def final_params(workdir: pathlib.Path) -> dict:
  """The parameters of the newest checkpoint in ``workdir``, as numpy arrays."""
  manager = ocp.CheckpointManager(
    pathlib.Path(workdir) / "checkpoints", item_names=("state", "data")
  )
  restored = manager.restore(
    manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())
  )
  manager.close()
  return jax.tree.map(np.asarray, restored.state["params"])


def relative_difference(a, b) -> float:
  """||a - b|| / ||b|| over all leaves of two pytrees, in float64."""
  pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  diff = sum(np.sum((np.float64(x) - np.float64(y)) ** 2) for x, y in pairs)
  norm = sum(np.sum(np.float64(y) ** 2) for _, y in pairs)
  return float(np.sqrt(diff / norm))


def losses(workdir: pathlib.Path | str) -> dict[int, float]:
  """step -> training loss, from a run's metrics.jsonl."""
  return {r["step"]: r["loss"] for r in read_metrics(pathlib.Path(workdir) / "metrics.jsonl")}


def subprocess_env(**extra: str) -> dict[str, str]:
  """The environment of a trainer subprocess: this one's, the repo on PYTHONPATH."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  env.update(extra)
  return env


def start_train(args: Sequence[str], **env: str) -> subprocess.Popen:
  """``python -m train`` with ``args`` in a subprocess (output captured)."""
  return subprocess.Popen(
    [sys.executable, "-m", "train", *args],
    cwd=ROOT,
    env=subprocess_env(**env),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def wait_for_step(
  process: subprocess.Popen, workdir: pathlib.Path, step: int, timeout: float = 120.0
) -> int:
  """Waits until ``workdir``'s metrics.jsonl has logged ``step``; the newest step logged.

  Raises:
    AssertionError: the process ended first, or the timeout passed.
  """
  path = pathlib.Path(workdir) / "metrics.jsonl"
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise AssertionError(
        f"trainer exited ({process.returncode}) before step {step}:\n"
        + process.stdout.read()[-5000:]
      )
    steps = [0]
    if path.exists():
      for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):  # a line being written
          steps.append(json.loads(line)["step"])
    if max(steps) >= step:
      return max(steps)
    time.sleep(0.01)
  process.kill()
  raise AssertionError(f"trainer did not reach step {step} in {timeout} s")


def use_compilation_cache(directory: pathlib.Path):
  """Context manager: JAX's persistent compilation cache in ``directory`` while active.

  Trainer runs in tests rebuild their jitted functions, and subprocesses start cold; with the
  cache every distinct program compiles once per test session. The previous setting is put
  back on exit, so other tests run as before.
  """

  @contextlib.contextmanager
  def manager():
    previous = (
      jax.config.jax_compilation_cache_dir,
      jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
      yield
    finally:
      jax.config.update("jax_compilation_cache_dir", previous[0])
      jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
      compilation_cache.reset_cache()

  return manager()


def cache_env(directory: pathlib.Path) -> dict[str, str]:
  """Environment variables that give a subprocess the same compilation cache."""
  return {
    "JAX_COMPILATION_CACHE_DIR": str(directory),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  }
