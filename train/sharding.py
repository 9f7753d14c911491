"""The device mesh, and logical axis names mapped onto it.

Axis types: the mesh is built with ``AxisType.Auto`` on every axis, deliberately. On jax
0.10.2 ``jax.make_mesh`` defaults to ``Explicit`` axes, under which every array's sharding is
part of its type: each operation whose output sharding is ambiguous (a contraction over a
sharded dimension, a gather from a sharded table, the chunked loss's dynamic slices of the
vocabulary-sharded classifier) must be told its ``out_sharding``, ``with_sharding_constraint``
becomes an error where a ``reshard`` is meant, and Flax's logical-axis rules reshard variables
eagerly. With ``Auto`` axes the compiler (GSPMD/Shardy) propagates shardings from the jitted
step's in/out shardings and from the activation constraints below, which are hints, so the
same model code runs on one device and on a (data, fsdp, tensor) pod mesh.

Logical names: parameters and activations carry logical axis names (``"vocab"``, ``"embed"``,
``"act_batch"``, ...; the full list is ``train.config.DEFAULT_RULES``), and the config's
``mesh.rules`` map each to mesh axes. Flax reads them through ``nnx.logical_axis_rules``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.core import spmd as flax_spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from train.config import MESH_AXES, ConfigError, MeshConfig

LogicalRules = tuple[tuple[str, Any], ...]


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes for ``num_devices`` devices, the -1 axis filled in.

  Raises:
    ConfigError: the sizes do not multiply to ``num_devices``.
  """
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(
        f"mesh: {num_devices} devices are not a multiple of the fixed axes "
        f"(data={cfg.data}, fsdp={cfg.fsdp}, tensor={cfg.tensor})"
      )
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(
      f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are "
      f"{num_devices} devices; set one axis to -1 to fill them"
    )
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types over ``devices`` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except NotImplementedError:
    # A TPU torus that the mesh cannot be laid on in whole physical axes (a v5p-256, 4x4x8, as
    # data 2 x fsdp 16 x tensor 4): let a mesh axis take part of a physical one.
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_rules(rules: Mapping[str, Any]) -> LogicalRules:
  """The config's rules in the form ``nnx.logical_axis_rules`` takes."""
  out = []
  for name, axes in rules.items():
    if axes is not None and not isinstance(axes, str):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def logical_to_spec(axes: Sequence[str | None], rules: LogicalRules) -> PartitionSpec:
  """The PartitionSpec of an array whose dimensions have logical names ``axes``.

  Raises:
    KeyError: a logical name the rules do not define.
  """
  table = dict(rules)
  specs = []
  for axis in axes:
    if axis is None:
      specs.append(None)
    elif axis in table:
      specs.append(table[axis])
    else:
      raise KeyError(f"logical axis {axis!r} has no rule; rules define {sorted(table)}")
  return PartitionSpec(*specs)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """``x`` with a sharding constraint from logical ``axes``, inside a mesh with rules.

  A no-op outside ``jax.set_mesh`` or without ``nnx.logical_axis_rules``, so the model also
  runs unsharded (e.g. in a plain ``jax.jit`` on one device).
  """
  rules = flax_spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))


def batch_sharding(mesh: Mesh, rules: LogicalRules) -> NamedSharding:
  """Sharding of a (batch, seq) token array: rows over the ``act_batch`` axes."""
  return NamedSharding(mesh, logical_to_spec(("act_batch", "act_seq"), rules))


def check_divisible(shapes: Any, shardings: Any) -> None:
  """Raises ConfigError for an array dimension its mesh axes do not divide.

  Args:
    shapes: a pytree of arrays or ShapeDtypeStructs.
    shardings: the matching pytree of NamedShardings.
  """
  flat_shapes, _ = jax.tree_util.tree_flatten_with_path(shapes)
  flat_shardings = jax.tree.leaves(shardings)
  for (path, leaf), sharding in zip(flat_shapes, flat_shardings, strict=True):
    mesh_sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.devices.shape, strict=True))
    for dim, axes in zip(leaf.shape, sharding.spec, strict=False):
      if axes is None:
        continue
      names = (axes,) if isinstance(axes, str) else axes
      size = int(np.prod([mesh_sizes[a] for a in names]))
      if dim % size:
        raise ConfigError(
          f"{jax.tree_util.keystr(path)}: dimension {dim} is not divisible by mesh axes "
          f"{names} of size {size} (shape {leaf.shape}, spec {sharding.spec}); change "
          "mesh sizes or mesh.rules"
        )
