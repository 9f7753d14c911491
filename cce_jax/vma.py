"""Varying manual axes (``shard_map``'s ``check_vma``) of values built inside an implementation.

Inside ``jax.shard_map`` with ``check_vma=True`` every value records the manual mesh axes along
which it varies. A loop carry initialised with ``jnp.zeros`` varies along none, while the body
computes from inputs that vary (``c`` split over the vocabulary, ``e`` over the tokens), so
carries and outputs must be cast to vary like the inputs (``jax.lax.pcast(..., to="varying")``).
Outside ``shard_map`` (or with ``check_vma=False``) these are no-ops.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax


def varying_axes(*refs: Any) -> frozenset[str]:
  """The union of the manual axes along which the arrays in the pytrees ``refs`` vary."""
  axes: set[str] = set()
  for ref in jax.tree.leaves(refs):
    aval = jax.typeof(ref)
    manual = getattr(aval, "manual_axis_type", None)  # jax 0.10
    axes |= set(manual.varying) if manual is not None else set(getattr(aval, "vma", ()))
  return frozenset(axes)


def vary_like(tree: Any, *refs: Any) -> Any:
  """``tree`` with every array cast to vary along the axes the ``refs`` vary along."""
  axes = varying_axes(*refs)
  if not axes:
    return tree

  def cast(x):
    missing = tuple(sorted(axes - varying_axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def shape_dtype_struct(shape: tuple[int, ...], dtype: Any, *refs: Any) -> jax.ShapeDtypeStruct:
  """A ``pallas_call`` ``out_shape`` that varies along the manual axes the ``refs`` vary along.

  With ``check_vma=True`` a ``pallas_call`` inside ``shard_map`` must say how each output
  varies (jax 0.10 spells it ``manual_axis_type``, later versions ``vma``).
  """
  axes = varying_axes(*refs)
  if not axes:
    return jax.ShapeDtypeStruct(shape, dtype)
  for ref in jax.tree.leaves(refs):
    manual = getattr(jax.typeof(ref), "manual_axis_type", None)
    if manual is not None:
      return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual.update(varying=axes))
  return jax.ShapeDtypeStruct(shape, dtype, vma=axes)
