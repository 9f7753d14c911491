"""Backend dispatch: which implementation ``impl`` names, and where its code lives.

The Pallas implementations live in the sibling package ``pallas_kernels`` and are imported on
first use, so ``import cce_jax`` never pulls in Pallas (nor its GPU/TPU lowerings).
"""

from __future__ import annotations

import importlib

import jax

from cce_jax import checks
from cce_jax.tiled import Implementation

# What impl="auto" picks on each backend. A Pallas implementation becomes the choice of its
# backend only once benchmarks/RESULTS.md shows it faster than "xla" on real hardware.
AUTO_IMPL = {"cpu": "xla", "gpu": "xla", "cuda": "xla", "rocm": "xla", "tpu": "xla"}

# impl -> module exposing ``IMPLEMENTATION: cce_jax.tiled.Implementation``.
_MODULES = {
    "reference": "cce_jax.reference",
    "xla": "cce_jax.xla_chunked",
    "pallas_gpu": "pallas_kernels.gpu",
    "pallas_tpu": "pallas_kernels.tpu",
    "pallas_mosaic_gpu": "pallas_kernels.mosaic_gpu",
}


def resolve_impl(impl: str, backend: str | None = None) -> str:
  """The implementation ``impl`` names on ``backend`` (default: JAX's default backend).

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
    return AUTO_IMPL.get(backend or jax.default_backend(), "xla")
  implementation(impl)  # raises NotImplementedError when it is missing
  return impl


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
