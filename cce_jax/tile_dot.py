"""The matrix product of two tiles, accumulated in float32, as each compile target runs it
fastest; every tile product of the "xla" implementation goes through :func:`tile_dot`.

On XLA:CPU a ``dot_general`` of two bfloat16 (or float16) operands with a float32 result runs
at about half the speed of the same product in float32 inside the tiled loops. A product of
two 16-bit floats is exact in float32 (8 + 8 or 11 + 11 significant bits fit in float32's
24), so converting the two operand *tiles* to float32 first computes the same products, with
float32 accumulation as before, only faster: :func:`upcasts_16bit` says when to (compiling for
CPU). GPUs and TPUs keep their native 16-bit products (tensor cores, the MXU): their lowering
does not change. Only tiles are converted, never a whole (V, D) classifier.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

DotDims = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]
SIXTEEN_BIT_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def upcasts_16bit(*arrays: Any) -> bool:
  """Whether the tile products of ``arrays`` (the call's whole inputs, e.g. ``e`` and ``c``)
  are compiled for CPU, where :func:`tile_dot` converts 16-bit operand tiles to float32: the
  platform of their shardings or of the mesh in context (``checks.compile_platform``), else
  JAX's default backend (``target.platform``). Decided at trace time."""
  # Imported here: cce_jax.checks imports loss_math, which imports this module.
  from cce_jax import checks, target

  platform = checks.compile_platform(*arrays) or target.platform()
  return platform == "cpu"


def tile_dot(a: jax.Array, b: jax.Array, dims: DotDims, upcast: bool = False) -> jax.Array:
  """``lax.dot_general(a, b, dims)`` accumulated and returned in float32.

  Args:
    a, b: two tiles of the same float dtype (any shapes ``dims`` contracts).
    dims: the ``dimension_numbers`` of ``lax.dot_general``.
    upcast: convert bfloat16/float16 operands to float32 before the product (exact: see the
      module docstring); pass :func:`upcasts_16bit` of the call's inputs.

  Returns:
    The product, float32.
  """
  if upcast and jnp.dtype(a.dtype) in SIXTEEN_BIT_FLOATS:
    a = a.astype(jnp.float32)
  if upcast and jnp.dtype(b.dtype) in SIXTEEN_BIT_FLOATS:
    b = b.astype(jnp.float32)
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
