"""The platform a computation is being traced for: the host's, or the mesh's when it names one.

A program is normally compiled for JAX's default backend. Ahead-of-time compilation for
accelerators this host does not have (``cce_jax.aot``: TPU topologies, deviceless GPUs) traces
under ``jax.set_mesh(mesh)`` (or ``jax.sharding.use_abstract_mesh``) with a mesh of the
target's devices; JAX records their platform and device kind in the abstract mesh. The loss
reads them from there, so that its backend check, its default tile sizes and ``impl="auto"``
follow the compile target rather than the CPU it is traced on. Nothing here is state of ours:
the mesh in context is JAX's.
"""

from __future__ import annotations

import jax


def abstract_device(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None):
  """The ``AbstractDevice`` of ``mesh`` (default: the mesh in context), or None where the mesh
  names none."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  elif isinstance(mesh, jax.sharding.Mesh):
    mesh = mesh.abstract_mesh
  return getattr(mesh, "abstract_device", None)


def platform(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> str:
  """The platform (``"cpu"``, ``"tpu"``, ``"gpu"``/``"cuda"``/``"rocm"``) being compiled for.

  That of ``mesh``'s devices when given, else of the mesh in context (``jax.set_mesh``) when
  it has devices, else ``jax.default_backend()``.
  """
  device = abstract_device(mesh)
  return jax.default_backend() if device is None else device.platform


def device_kind(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> str | None:
  """``jax.Device.device_kind`` of the target's devices (as :func:`platform` finds them), or
  None when no mesh in context names them (then the host's devices are the target)."""
  device = abstract_device(mesh)
  return None if device is None else device.device_kind
