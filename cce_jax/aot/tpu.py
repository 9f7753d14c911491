"""TPU topologies on a CPU host: devices to compile for, meshes over them, the compiler's numbers.

With ``libtpu`` installed (``pip install -e ".[tpu-aot]"``), JAX describes the devices of a TPU
slice that is not attached (``jax.experimental.topologies``), and ``jax.jit(f).lower(...)
.compile()`` for inputs sharded over them runs the real XLA:TPU compiler, Mosaic (the Pallas
TPU kernels) included::

    from cce_jax.aot import tpu

    mesh = tpu.make_mesh("v5p:2x2x4", (4, 4), ("data", "tensor"))   # a v5p-32: 16 chips
    with jax.set_mesh(mesh):    # the loss sees that it is compiled for TPU (cce_jax.target)
      compiled = jax.jit(step).lower(*abstract_inputs_sharded_over(mesh)).compile()
    print(tpu.compile_report(compiled))   # per-device memory, flops, bytes, time estimate

Topologies are named ``GENERATION:SHAPE`` in chips: ``v5e:2x2`` and ``v6e:2x4`` (2D, one
TensorCore per chip), ``v4:2x2x1`` and ``v5p:2x2x4`` (3D, one JAX device per chip: the two
TensorCores of a v4 or v5p chip act as one, "megacore", as on a real slice). ``v5e:1x1`` is
one chip. Run with ``JAX_PLATFORMS=cpu`` so that JAX does not look for an attached TPU.

Nothing is run: the numbers are the compiler's plan and its own estimates.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax

from cce_jax.aot.report import CompileReport, memory_report

# The chips libtpu's topology descriptions cover here, as train.hardware names them.
GENERATIONS = ("v4", "v5e", "v5p", "v6e")
# 3D-torus generations (x*y*z chips) and 2D ones (x*y chips).
_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
# libtpu's default chips per host (x, y, z); smaller topologies fit one host of their size.
_HOST_BOUNDS = (2, 2, 1)
INSTALL_HINT = 'pip install -e ".[tpu-aot]" (libtpu for the installed jax)'
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):([1-9][0-9]*(?:x[1-9][0-9]*){1,2})$")


def has_libtpu() -> bool:
  """Whether the TPU compiler (the ``libtpu`` package) is installed."""
  return importlib.util.find_spec("libtpu") is not None


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  """``"v5p:2x2x4"`` -> ``("v5p", (2, 2, 4))``.

  Raises:
    ValueError: not ``GENERATION:SHAPE`` with a generation of :data:`GENERATIONS` and as many
      dimensions as it has (3 for v4/v5p, 2 for v5e/v6e).
  """
  match = _TOPOLOGY.match(topology) if isinstance(topology, str) else None
  if match is None:
    raise ValueError(
      f"topology must be GENERATION:SHAPE with a generation of {GENERATIONS}, e.g. 'v5e:2x2' "
      f"or 'v5p:2x2x4', got {topology!r}"
    )
  generation = match.group(1)
  shape = tuple(int(n) for n in match.group(2).split("x"))
  if len(shape) != _DIMS[generation]:
    example = "2x2x1" if _DIMS[generation] == 3 else "2x2"
    raise ValueError(
      f"topology {topology!r}: a {generation} slice has {_DIMS[generation]} dimensions "
      f"(e.g. '{generation}:{example}'), got {len(shape)}"
    )
  return generation, shape


def default_topology(chip: str, chips: int) -> str:
  """The topology of a slice of ``chips`` chips of generation ``chip``, as Cloud TPU shapes
  them: one chip is ``1x1`` (``1x1x1``); from four chips (``2x2``, ``2x2x1``) each doubling
  doubles the smallest dimension, the last of equal ones (v5p: 16 chips are ``2x2x4``, 128
  are ``4x4x8``; v5e: 8 are ``2x4``, 32 are ``4x8``).

  Raises:
    ValueError: a chip not in :data:`GENERATIONS`, or a count that is neither 1 nor 4 times
      a power of two.
  """
  if chip not in GENERATIONS:
    raise ValueError(f"no TPU topology for chip {chip!r}: TPU chips are {GENERATIONS}")
  dims = _DIMS[chip]
  if chips == 1:
    return f"{chip}:{'x'.join(['1'] * dims)}"
  doublings = math.log2(chips / 4) if chips >= 4 else -1.0
  if doublings < 0 or doublings != int(doublings):
    raise ValueError(
      f"no TPU {chip} slice of {chips} chips: give 1 or 4 x a power of two (4, 8, 16, ...), "
      "or name the topology yourself"
    )
  shape = [2, 2, 1][:dims] if dims == 3 else [2, 2]
  for _ in range(int(doublings)):
    smallest = min(shape)
    last = max(i for i, n in enumerate(shape) if n == smallest)
    shape[last] *= 2
  return f"{chip}:{'x'.join(str(n) for n in shape)}"


def tpu_devices(topology: str) -> list[jax.Device]:
  """The (compile-only) devices of a TPU slice, one per chip, on this host.

  Sets ``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` (unless set) before libtpu first loads: compiling holds
  no TPU, so processes compiling side by side need not take libtpu's lock.

  Raises:
    ValueError: a malformed or unknown topology (see :func:`parse_topology`), or one libtpu
      rejects (its message included).
    ModuleNotFoundError: libtpu is not installed (the message says how to install it).
  """
  generation, shape = parse_topology(topology)
  if not has_libtpu():
    raise ModuleNotFoundError(
      f"compiling for TPU topology {topology!r} needs the TPU compiler, libtpu, which is not "
      f"installed: {INSTALL_HINT}",
      name="libtpu",
    )
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  options: dict[str, Any] = {}
  if generation == "v4":
    options["chip_config_name"] = "megacore"  # one device per chip, as JAX on a v4 slice
  padded = (*shape, 1) if len(shape) == 2 else shape
  if any(n < bound for n, bound in zip(padded, _HOST_BOUNDS, strict=True)):
    options["chips_per_host_bounds"] = tuple(
      min(n, bound) for n, bound in zip(padded, _HOST_BOUNDS, strict=True)
    )
  try:
    description = topologies.get_topology_desc(platform="tpu", topology_name=topology, **options)
  except jax.errors.JaxRuntimeError as error:
    raise ValueError(f"libtpu rejects TPU topology {topology!r}: {error}") from error
  return list(description.devices)


def make_mesh(
  topology: str, axis_shapes: Sequence[int], axis_names: Sequence[str], **kwargs: Any
) -> jax.sharding.Mesh:
  """A mesh of shape ``axis_shapes`` over every device of ``topology``.

  ``kwargs`` go to ``jax.make_mesh`` (e.g. ``axis_types``).

  Raises:
    ValueError: a bad topology (:func:`tpu_devices`), or a mesh whose size is not the
      topology's device count.
  """
  devices = tpu_devices(topology)
  if math.prod(axis_shapes) != len(devices):
    raise ValueError(
      f"mesh shape {tuple(axis_shapes)} has {math.prod(axis_shapes)} devices, but topology "
      f"{topology!r} has {len(devices)}"
    )
  return jax.make_mesh(tuple(axis_shapes), tuple(axis_names), devices=devices, **kwargs)


def cost_numbers(compiled: Any) -> dict[str, float]:
  """``compiled.cost_analysis()`` as one dict (JAX versions return a dict or a list with one
  dict per program; the numbers of a list are summed); empty when there is none."""
  analysis = compiled.cost_analysis()
  if not analysis:
    return {}
  if isinstance(analysis, dict):
    return {k: float(v) for k, v in analysis.items() if isinstance(v, (int, float))}
  total: dict[str, float] = {}
  for part in analysis:
    for key, value in (part or {}).items():
      if isinstance(value, (int, float)):
        total[key] = total.get(key, 0.0) + float(value)
  return total


def has_loops(compiled: Any) -> bool:
  """Whether the compiled program holds a while loop (``lax.scan``, ``fori_loop``, ...)."""
  return " while(" in compiled.as_text()


def compile_report(compiled: Any) -> CompileReport:
  """The per-device memory and cost numbers of a program compiled for TPU.

  ``flops`` and ``bytes_accessed`` are XLA:TPU's cost analysis, which counts a while loop's
  body once: they understate programs that loop (:func:`has_loops`), such as
  ``impl="xla"``'s or a scanned train step. ``estimated_seconds`` is its ``optimal_seconds``;
  None for a program that loops (the estimate would be of one iteration) and where the compiler
  gives none (a negative value).
  """
  costs = cost_numbers(compiled)
  seconds = costs.get("optimal_seconds")
  if seconds is not None and (seconds < 0 or has_loops(compiled)):
    seconds = None
  return dataclasses.replace(
    memory_report(compiled),
    flops=costs.get("flops"),
    bytes_accessed=costs.get("bytes accessed"),
    estimated_seconds=seconds,
  )
