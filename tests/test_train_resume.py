"""Exact resume: a run killed (SIGKILL) or preempted (SIGTERM) mid-way and resumed from its
checkpoints logs the same losses, bit for bit, as the uninterrupted run (on CPU). SIGINT
(Ctrl-C) saves and stops like SIGTERM.

The interrupted run is a real ``python -m train`` subprocess. It evaluates after every step
(``eval_every=1``): evaluation reads neither the train state nor the train iterator, and it
slows each step down enough that the signal lands well before the run's end.
"""

from __future__ import annotations

import signal

import pytest
import train_testing

STEPS, SIGNAL_AFTER, CHECKPOINT_EVERY = train_testing.REFERENCE_STEPS, 8, 4
SLOW_STEPS = ["eval_every=1", "eval_batches=16"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  with train_testing.session(tmp_path_factory) as base:
    yield base


def _interrupted_run(base, workdir, sig: signal.Signals) -> tuple[int, int, str]:
  """Starts a run, sends ``sig`` once step SIGNAL_AFTER is logged; (logged step, rc, output)."""
  args = train_testing.overrides(
    workdir,
    base / "data_cache",
    f"steps={STEPS}",
    f"checkpoint_every={CHECKPOINT_EVERY}",
    *SLOW_STEPS,
  )
  process = train_testing.start_train(args, **train_testing.cache_env(base / "jax_cache"))
  logged = train_testing.wait_for_step(process, workdir, SIGNAL_AFTER)
  process.send_signal(sig)
  output, _ = process.communicate(timeout=120)
  assert logged < STEPS, "the run ended before the signal: nothing was interrupted"
  return logged, process.returncode, output


def _resume(base, workdir):
  return train_testing.train(
    train_testing.overrides(
      workdir, base / "data_cache", f"steps={STEPS}", f"checkpoint_every={CHECKPOINT_EVERY}"
    )
  )


def test_resume_after_sigkill_is_exact(base, tmp_path):
  logged, returncode, output = _interrupted_run(base, tmp_path, signal.SIGKILL)
  assert returncode == -signal.SIGKILL, output
  result = _resume(base, tmp_path)
  assert 0 < result.start_step <= logged
  assert result.step == STEPS
  assert train_testing.losses(tmp_path) == train_testing.reference_losses(base, STEPS)


def test_resume_after_sigterm_is_exact(base, tmp_path):
  logged, returncode, output = _interrupted_run(base, tmp_path, signal.SIGTERM)
  assert returncode == 0, output
  assert "SIGTERM: saved a checkpoint at step" in output
  # SIGTERM saved the step it stopped at, even off the checkpoint_every grid.
  saved = int(output.split("SIGTERM: saved a checkpoint at step ")[1].split(";")[0])
  assert saved >= logged
  result = _resume(base, tmp_path)
  assert result.start_step == saved
  assert train_testing.losses(tmp_path) == train_testing.reference_losses(base, STEPS)


@pytest.mark.slow  # the SIGTERM test above covers the same handler by default
def test_sigint_saves_and_stops_like_sigterm(base, tmp_path):
  logged, returncode, output = _interrupted_run(base, tmp_path, signal.SIGINT)
  assert returncode == 0, output
  assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
  saved = int(output.split("SIGINT: saved a checkpoint at step ")[1].split(";")[0])
  assert saved >= logged
  # The save was committed before the process exited.
  assert (tmp_path / "checkpoints" / str(saved) / "state" / "commit_success.txt").is_file()
  assert not (tmp_path / "run.lock").exists()
