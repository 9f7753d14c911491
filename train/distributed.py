"""Multi-host setup: when to call ``jax.distributed.initialize``, and each host's data rows.

``distributed: auto`` initializes when the environment says this is one of several processes:
``JAX_COORDINATOR_ADDRESS`` is set (then ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` give the
process count and this process's id; JAX itself reads only the address), or a Slurm job with
several tasks, or a multi-host Cloud TPU slice (JAX's own cluster detection then fills in
everything). ``on`` always initializes (JAX detects the cluster), ``off`` never does.

``JAX_LOCAL_DEVICE_IDS`` (comma-separated device ids, e.g. ``0`` or ``0,1,2,3``) restricts the
process to those local devices, as a Slurm job running one process per GPU needs; it applies
with or without ``JAX_COORDINATOR_ADDRESS`` (alone, it does not make ``auto`` initialize). JAX
reads it too, but a malformed value fails here, as a config error naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
from jax.sharding import NamedSharding

from train.config import ConfigError


def _tpu_multihost(env: Mapping[str, str]) -> bool:
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def should_initialize(mode: str, env: Mapping[str, str] | None = None) -> bool:
  """Whether ``mode`` ("auto", "on", "off") asks for ``jax.distributed.initialize``."""
  env = os.environ if env is None else env
  if mode != "auto":
    return mode == "on"
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  return _tpu_multihost(env)


def local_device_ids(env: Mapping[str, str] | None = None) -> list[int] | None:
  """The device ids of ``JAX_LOCAL_DEVICE_IDS`` ("0,1,2,3"); None if unset or empty.

  Raises:
    ConfigError: a value that is not distinct non-negative integers separated by commas.
  """
  env = os.environ if env is None else env
  value = env.get("JAX_LOCAL_DEVICE_IDS", "")
  if not value.strip():
    return None
  try:
    ids = [int(part) for part in value.split(",")]
  except ValueError:
    ids = None
  if ids is None or min(ids) < 0 or len(set(ids)) != len(ids):
    raise ConfigError(
      f"JAX_LOCAL_DEVICE_IDS={value!r} must be distinct non-negative integers "
      "separated by commas, e.g. '0' or '0,1,2,3'"
    )
  return ids


def initialize_arguments(env: Mapping[str, str] | None = None) -> dict[str, object]:
  """Keyword arguments of ``jax.distributed.initialize`` from ``JAX_*`` variables.

  Raises:
    ConfigError: ``JAX_COORDINATOR_ADDRESS`` without ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``,
      or one of them not an integer; a malformed ``JAX_LOCAL_DEVICE_IDS``.
  """
  env = os.environ if env is None else env
  kwargs: dict[str, object] = {}
  ids = local_device_ids(env)
  if ids is not None:
    kwargs["local_device_ids"] = ids
  address = env.get("JAX_COORDINATOR_ADDRESS")
  if not address:
    return kwargs
  try:
    kwargs.update(
      coordinator_address=address,
      num_processes=int(env["JAX_NUM_PROCESSES"]),
      process_id=int(env["JAX_PROCESS_ID"]),
    )
  except (KeyError, ValueError) as error:
    raise ConfigError(
      "JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and JAX_PROCESS_ID must be "
      f"integers too (got JAX_NUM_PROCESSES={env.get('JAX_NUM_PROCESSES')!r}, "
      f"JAX_PROCESS_ID={env.get('JAX_PROCESS_ID')!r})"
    ) from error
  return kwargs


def initialize(mode: str) -> bool:
  """Calls ``jax.distributed.initialize`` if ``mode`` and the environment ask for it.

  Must run before anything touches a JAX backend. CPU processes use gloo collectives.

  Returns:
    Whether this process is (now) part of a multi-process run.
  """
  if jax.distributed.is_initialized():
    return True
  if not should_initialize(mode):
    return False
  kwargs = initialize_arguments()
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True


def process_rows(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
  """(index, count): this host loads block ``index`` of the batch cut into ``count`` blocks.

  Hosts whose devices hold the same rows (a mesh axis that spans hosts but not the batch) get
  the same index and load the same rows; ``jax.make_array_from_process_local_data`` then
  assembles the global batch.

  Raises:
    ConfigError: this host's rows are not one contiguous block dividing the batch.
  """
  index_map = sharding.addressable_devices_indices_map((batch_size, 1))
  rows = sorted({index[0].indices(batch_size)[:2] for index in index_map.values()})
  start, stop = rows[0][0], max(r[1] for r in rows)
  covered = start
  for lo, hi in rows:
    if lo > covered:
      break
    covered = max(covered, hi)
  size = stop - start
  if covered != stop or batch_size % size or start % size:
    raise ConfigError(
      f"process {jax.process_index()} holds batch rows {rows}, not one "
      f"contiguous block dividing batch_size={batch_size}; change the mesh"
    )
  return start // size, batch_size // size
