"""Lowering GPU kernels for CUDA on a machine without a GPU, on every supported JAX.

``jax.export(..., platforms=["cuda"])`` runs the Pallas-to-Triton (or Mosaic GPU) lowering on a
CPU host, which is how the tests (and the probes beside this module) check, short of a GPU,
that kernels lower. The Triton lowering needs to know which GPU it targets:

* JAX 0.10 takes the local GPU, or without one falls back to compute capability 9.0 (H100);
* JAX 0.11 and newer read the target from the abstract mesh in context
  (``jax.sharding.use_abstract_mesh`` with an ``AbstractMesh`` carrying a
  ``jax.sharding.AbstractDevice``) and raise "No supported GPU devices found, please specify an
  abstract GPU device using AbstractDevice" without one.

:func:`cuda_target` gives the lowering its target both ways: an abstract GPU device where JAX
reads one, nothing (the fallback, H100) where it does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import jax

# Device kinds as CUDA devices report them; JAX maps the kind to a compute capability
# ("NVIDIA H100..." -> sm_90, "NVIDIA A100..." -> sm_80).
DEVICE_KINDS = {"h100": "NVIDIA H100 80GB HBM3", "a100": "NVIDIA A100-SXM4-80GB"}
# Streaming multiprocessors of those parts (AbstractDevice.num_cores).
_NUM_CORES = {"h100": 132, "a100": 108}

# The custom calls that Pallas GPU kernels lower to.
TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_GPU_CALL = "mosaic_gpu_v2"


def reads_abstract_gpu_device() -> bool:
  """Whether this JAX takes the GPU a Pallas kernel is lowered for from the abstract mesh
  (0.11 and newer); 0.10 ignores it and lowers for compute capability 9.0 without a GPU."""
  return jax.__version_info__ >= (0, 11)


def abstract_gpu_device(generation: str = "h100") -> jax.sharding.AbstractDevice:
  """The ``AbstractDevice`` of one GPU of ``generation`` ("h100" or "a100").

  Raises:
    ValueError: an unknown ``generation``.
  """
  if generation not in DEVICE_KINDS:
    raise ValueError(f"`generation`={generation!r}: expected one of {sorted(DEVICE_KINDS)}")
  return jax.sharding.AbstractDevice(
    device_kind=DEVICE_KINDS[generation], num_cores=_NUM_CORES[generation], platform="gpu"
  )


def cuda_mesh(
  axis_names: Sequence[str], generation: str = "h100"
) -> jax.sharding.AbstractMesh | jax.sharding.Mesh:
  """A mesh of size 1 along each of ``axis_names`` to lower ``shard_map`` code for CUDA on any
  host: on JAX >= 0.11 an abstract mesh whose device is :func:`abstract_gpu_device` (pass it to
  :func:`export_for_cuda` as ``mesh``, and build the arguments' shardings on it); on JAX 0.10 a
  concrete mesh of the first local device, as the lowering there needs no GPU device."""
  if not reads_abstract_gpu_device():
    return jax.make_mesh((1,) * len(axis_names), tuple(axis_names), devices=jax.devices()[:1])
  return jax.sharding.AbstractMesh(
    (1,) * len(axis_names), tuple(axis_names), abstract_device=abstract_gpu_device(generation)
  )


@contextlib.contextmanager
def cuda_target(
  generation: str = "h100", mesh: jax.sharding.AbstractMesh | jax.sharding.Mesh | None = None
) -> Iterator[None]:
  """Context in which a CUDA lowering on a CPU host targets one GPU of ``generation``.

  On JAX >= 0.11 an abstract mesh whose device is that GPU is in context: ``mesh`` (from
  :func:`cuda_mesh`, when the lowered code runs ``shard_map`` over it: JAX wants the context
  mesh to be the ``shard_map`` mesh) or a one-axis mesh of size 1. On JAX 0.10 nothing
  changes: its lowering targets sm_90 without a GPU, whatever ``generation`` says.
  """
  if not reads_abstract_gpu_device():
    yield
    return
  if mesh is None:
    mesh = cuda_mesh(("_",), generation)
  with jax.sharding.use_abstract_mesh(mesh):
    yield


def export_for_cuda(
  fn: Callable,
  args: Sequence,
  *,
  generation: str = "h100",
  mesh: jax.sharding.AbstractMesh | jax.sharding.Mesh | None = None,
  custom_calls: Sequence[str] = (TRITON_CALL,),
) -> jax.export.Exported:
  """``jax.export`` of ``jax.jit(fn)`` for CUDA at ``args`` (``jax.ShapeDtypeStruct`` s or
  arrays), on any host, targeting a GPU of ``generation`` (see :func:`cuda_target` for
  ``mesh``); ``custom_calls`` are the kernel custom-call targets allowed through the export's
  safety check (they are not among those JAX keeps stable across versions)."""
  checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in custom_calls]
  with cuda_target(generation, mesh):
    return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
