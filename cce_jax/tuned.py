"""The table of measured winners that ``benchmarks/accelerator.py --apply`` writes.

``cce_jax/tuned.json`` ships with the package (empty until a GPU or TPU run is applied). Its
``entries`` map a device kind (``jax.Device.device_kind``, e.g. "NVIDIA H100 80GB HBM3" or
"TPU v5 lite") to one entry per input dtype name ("bfloat16", "float32")::

  {"impl": "xla" | "pallas_gpu" | "pallas_tpu",   # what impl="auto" picks there
   "xla": {"token_block": int, "vocab_block": int},  # the fastest impl="xla" tiles
   "date": "YYYY-MM-DD", "jax": "0.10.2"}

``BlockSizes.get_default`` takes ``"xla"`` from the entry of the device it runs on, and
``impl="auto"`` (``cce_jax.dispatch.resolve_impl``) takes ``"impl"``; without an entry both
fall back to the modelled defaults (``docs/tiling_model.md``).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from typing import Any

import jax
import numpy as np

from cce_jax import target

TABLE_NAME = "tuned.json"
FORMAT = 1


def check_table(table: Any, source: str) -> dict[str, dict[str, dict[str, Any]]]:
  """The ``entries`` of ``table`` (a parsed tuned.json), checked.

  Raises:
    ValueError: a table of another format, or an entry without a valid "impl" or "xla" key;
      the message names ``source`` and the key.
  """
  if not isinstance(table, dict) or table.get("format") != FORMAT:
    raise ValueError(f"{source}: `format` must be {FORMAT}; rewrite it with accelerator.py --apply")
  entries = table.get("entries")
  if not isinstance(entries, dict):
    raise ValueError(f"{source}: `entries` must be an object of device kinds")
  for kind, per_dtype in entries.items():
    for dtype, entry in per_dtype.items():
      where = f"{source}: entries[{kind!r}][{dtype!r}]"
      if entry.get("impl") not in ("xla", "pallas_gpu", "pallas_tpu"):
        raise ValueError(f"{where}.impl must be 'xla', 'pallas_gpu' or 'pallas_tpu'")
      tiles = entry.get("xla")
      if not isinstance(tiles, dict) or set(tiles) != {"token_block", "vocab_block"}:
        raise ValueError(f"{where}.xla must hold exactly token_block and vocab_block")
  return entries


@functools.cache
def shipped_entries() -> dict[str, dict[str, dict[str, Any]]]:
  """The checked ``entries`` of the tuned.json shipped in this package (read once)."""
  text = importlib.resources.files("cce_jax").joinpath(TABLE_NAME).read_text()
  return check_table(json.loads(text), f"cce_jax/{TABLE_NAME}")


def device_kind(backend: str | None = None) -> str | None:
  """``device_kind`` of the first device of ``backend``; None when that backend is not present
  in this process. With ``backend`` None: the device kind being compiled for
  (:func:`cce_jax.target.device_kind`, the mesh's in context), else JAX's default backend's."""
  if backend is None and (kind := target.device_kind()) is not None:
    return kind
  try:
    return jax.devices(backend)[0].device_kind
  except RuntimeError:
    return None


def lookup(dtype: Any, backend: str | None = None, entries: dict | None = None) -> dict | None:
  """The entry for ``dtype`` on ``backend``'s device kind in ``entries`` (the shipped table
  when None), or None."""
  entries = shipped_entries() if entries is None else entries
  if not entries:
    return None
  kind = device_kind(backend)
  dtype_name = np.dtype(dtype).name if dtype is not None else "float32"
  return entries.get(kind, {}).get(dtype_name) if kind is not None else None
