"""Backend dispatch: which implementation ``impl`` names, and where its code lives.

The Pallas implementations live in the sibling package ``pallas_kernels`` and are imported on
first use, so ``import cce_jax`` never pulls in Pallas (nor its GPU/TPU lowerings).
"""

from __future__ import annotations

import importlib

from cce_jax import checks, target, tuned
from cce_jax.tiled import Implementation

# What impl="auto" picks on each backend without a measurement. A Pallas implementation
# becomes the choice on a device kind only where `benchmarks/accelerator.py --apply` found it
# correct and faster than "xla" there (cce_jax/tuned.json, consulted first).
AUTO_IMPL = {"cpu": "xla", "gpu": "xla", "cuda": "xla", "rocm": "xla", "tpu": "xla"}

# impl -> module exposing ``IMPLEMENTATION: cce_jax.tiled.Implementation``.
_MODULES = {
  "reference": "cce_jax.reference",
  "xla": "cce_jax.xla_chunked",
  "pallas_gpu": "pallas_kernels.gpu",
  "pallas_tpu": "pallas_kernels.tpu",
  "pallas_mosaic_gpu": "pallas_kernels.mosaic_gpu",
}


def resolve_impl(impl: str, backend: str | None = None, dtype=None) -> str:
  """The implementation ``impl`` names on ``backend`` (default: the platform being compiled
  for, :func:`cce_jax.target.platform`, JAX's default backend outside an AOT mesh) for
  inputs of ``dtype``.

  "auto" is the measured winner for this device kind and ``dtype`` in
  ``cce_jax/tuned.json`` (with ``dtype`` None: a Pallas kernel only where it won for every
  dtype measured there), else ``AUTO_IMPL`` of the backend.

  Raises:
    ValueError: ``impl`` is not one of ``checks.IMPLS``.
    NotImplementedError: a Pallas implementation this installation does not ship.

  Example:
    >>> from cce_jax import resolve_impl
    >>> resolve_impl("auto", backend="cpu"), resolve_impl("reference")
    ('xla', 'reference')
  """
  checks.check_choice("impl", impl, checks.IMPLS)
  if impl == "auto":
    return _measured_auto(backend, dtype) or AUTO_IMPL.get(backend or target.platform(), "xla")
  implementation(impl)  # raises NotImplementedError when it is missing
  return impl


def _measured_auto(backend: str | None, dtype, entries: dict | None = None) -> str | None:
  """impl="auto" as measured on ``backend``'s device kind (``cce_jax.tuned``), or None."""
  if dtype is not None:
    entry = tuned.lookup(dtype, backend, entries)
    return None if entry is None else entry["impl"]
  entries = tuned.shipped_entries() if entries is None else entries
  per_dtype = entries.get(tuned.device_kind(backend) or "", {}) if entries else {}
  impls = {entry["impl"] for entry in per_dtype.values()}
  return impls.pop() if len(impls) == 1 else ("xla" if impls else None)


def implementation(impl: str) -> Implementation:
  """The :class:`cce_jax.tiled.Implementation` registered as ``impl`` (not "auto").

  Raises:
    NotImplementedError: an implementation this installation does not ship.
  """
  module_name = _MODULES[impl]
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as err:
    if err.name is None or not module_name.startswith(err.name):
      raise
    raise NotImplementedError(
      f"`impl`={impl!r} is not available in this installation ({module_name} is missing); "
      "use impl='xla' (every backend) or impl='auto'."
    ) from err
  implementation = getattr(module, "IMPLEMENTATION", None)
  if implementation is None:
    raise NotImplementedError(
      f"`impl`={impl!r} is not available in this version ({module_name} registers no "
      "IMPLEMENTATION); use impl='xla' (every backend) or impl='auto'."
    )
  return implementation
