"""Parallel runs match the single-device run: a (data=2, fsdp=2, tensor=2) mesh of 8 forced CPU
devices, and two processes joined by ``jax.distributed.initialize`` on 127.0.0.1.

Both train the reference tiny run (f32 compute, 24 steps) in ``python -m train``
subprocesses. The sharded run also accumulates gradients over 2 micro-batches. Sums are then
reduced in another order (per device, then across devices; per micro-batch, then across them)
and the subprocesses compile with ``--xla_backend_optimization_level=0`` (faster; it changes
fusion, so rounding again), so the losses agree to float32 rounding compounded over the steps,
not bit for bit: measured <= 5e-7 relative; the bound is 2e-5.
"""

from __future__ import annotations

import pytest
import train_testing

STEPS = train_testing.REFERENCE_STEPS
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  with train_testing.session(tmp_path_factory) as base:
    yield base


def _assert_matches_reference(base, workdir):
  reference = train_testing.reference_losses(base, STEPS)
  losses = train_testing.losses(workdir)
  assert sorted(losses) == sorted(reference)
  for step, loss in reference.items():
    assert abs(losses[step] - loss) <= TOLERANCE * abs(loss), (step, losses[step], loss)


def test_sharded_2x2x2_matches_single_device(base, tmp_path):
  args = train_testing.overrides(
    tmp_path,
    base / "data_cache",
    f"steps={STEPS}",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.tensor=2",
    "grad_accum_steps=2",
  )
  process = train_testing.start_train(
    args,
    XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {train_testing.FAST_COMPILE}",
    JAX_PLATFORMS="cpu",
    **train_testing.cache_env(base / "jax_cache"),
  )
  output, _ = process.communicate(timeout=600)
  assert process.returncode == 0, output
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in output
  _assert_matches_reference(base, tmp_path)


def test_two_processes_match_single_process(base, tmp_path):
  args = train_testing.overrides(tmp_path, base / "data_cache", f"steps={STEPS}")
  env = {
    "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{train_testing.free_port()}",
    "JAX_NUM_PROCESSES": "2",
    "XLA_FLAGS": train_testing.FAST_COMPILE,
    "JAX_PLATFORMS": "cpu",
    **train_testing.cache_env(base / "jax_cache"),
  }
  processes = [train_testing.start_train(args, JAX_PROCESS_ID=str(i), **env) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for process, output in zip(processes, outputs, strict=True):
    assert process.returncode == 0, output
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in outputs[0]
  # Each host saved its own data-iterator state; process 0 alone wrote the metrics.
  data_dir = tmp_path / "checkpoints" / str(STEPS) / "data"
  assert sorted(p.name for p in data_dir.glob("process_*")) == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
  assert f"step {STEPS}: loss" not in outputs[1]
  _assert_matches_reference(base, tmp_path)
