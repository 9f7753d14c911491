"""Checks before a run spends time: the data fills its batches, the compiled step fits memory.

Both raise :class:`train.config.ConfigError` with one line that names the numbers and the
config keys to change; ``python -m train`` prints it and exits with status 2. The data check
runs before anything is compiled; the memory check right after the train step is compiled,
before the state is initialized, so a config that cannot fit stops in seconds instead of with
an out-of-memory error after minutes of compiling and loading.
"""

from __future__ import annotations

from typing import Any

from train.config import ConfigError, TrainConfig

GIB = 2**30
# The keys that shrink a train step's memory, named by the memory check's message.
MEMORY_KEYS = (
  "batch_size",
  "grad_accum_steps",
  "mesh (fsdp/tensor)",
  "model.remat=true",
  "model.attention_chunk",
)


def size(num_bytes: int) -> str:
  """Bytes as "12.34 GiB", or "5.6 MiB" below a GiB."""
  if num_bytes >= GIB:
    return f"{num_bytes / GIB:.2f} GiB"
  return f"{num_bytes / 2**20:.1f} MiB"


def check_data(cfg: TrainConfig, num_train_tokens: int, num_eval_tokens: int) -> None:
  """Checks that the train split fills one global batch and, when ``cfg.eval_every > 0``, the
  eval split ``cfg.eval_batches`` of them (windows of ``cfg.seq_len`` tokens, without reuse).

  Raises:
    ConfigError: naming the split, the windows it holds, the windows needed and the keys to
      change.
  """
  seq_len, batch = cfg.seq_len, cfg.batch_size
  needs = [("train", num_train_tokens, batch, f"one global batch (batch_size={batch})")]
  if cfg.eval_every > 0:
    needs.append(
      (
        "eval",
        num_eval_tokens,
        batch * cfg.eval_batches,
        f"evaluation (eval_batches={cfg.eval_batches} x batch_size={batch})",
      )
    )
  for split, tokens, windows_needed, what in needs:
    windows = tokens // seq_len
    if windows >= windows_needed:
      continue
    fixes = "more data (data.source, data.paths), a smaller batch_size or seq_len"
    if split == "eval":
      fixes += ", a larger data.eval_fraction, fewer eval_batches, or eval_every=0"
    elif cfg.data.source == "stdlib":
      fixes += ", or a larger data.max_corpus_bytes"
    raise ConfigError(
      f"data: the {split} split holds {tokens} tokens = {windows} windows of "
      f"seq_len={seq_len}, but {what} needs {windows_needed}; use {fixes}"
    )


def device_memory_limit(device: Any) -> int | None:
  """The bytes a device may allocate, as its backend reports it (``bytes_limit``); None where
  the backend reports none (CPU)."""
  stats = device.memory_stats() or {}
  limit = stats.get("bytes_limit")
  return None if limit is None else int(limit)


def check_memory(
  peak_bytes: int | None, limit_bytes: int | None, device_kind: str, mesh_shape: dict[str, int]
) -> None:
  """Checks that a compiled step's per-device peak fits the device's limit.

  Args:
    peak_bytes: the compiled step's arguments + outputs - donated + temporaries, per device
      (None: not reported, nothing to check).
    limit_bytes: the device's ``bytes_limit`` (None: not reported, nothing to check).
    device_kind: ``jax.Device.device_kind``, for the message.
    mesh_shape: the mesh's axis sizes, for the message.

  Raises:
    ConfigError: the peak exceeds the limit; the message names both and the keys to change.
  """
  if peak_bytes is None or limit_bytes is None or peak_bytes <= limit_bytes:
    return
  raise ConfigError(
    f"memory: the compiled train step needs {size(peak_bytes)} per device, more than the "
    f"{size(limit_bytes)} a {device_kind} device allows (mesh {mesh_shape}); "
    f"change {', '.join(MEMORY_KEYS)}, and check with python -m train.aot"
  )


def peak_bytes(compiled: Any) -> int | None:
  """A compiled step's per-device peak: arguments + outputs - donated (aliased) buffers +
  temporaries, from ``compiled.memory_analysis()``; None where the backend reports none."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    - stats.alias_size_in_bytes
    + stats.temp_size_in_bytes
  )


def check_compiled(compiled: Any, mesh: Any) -> None:
  """:func:`check_memory` of a compiled train step against the limit of this host's first
  device of ``mesh`` (every device of a slice is the same kind).

  Raises:
    ConfigError: the step's peak exceeds the device's ``bytes_limit``.
  """
  import jax

  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  device = local[0] if local else jax.local_devices()[0]
  check_memory(
    peak_bytes(compiled), device_memory_limit(device), device.device_kind, dict(mesh.shape)
  )
