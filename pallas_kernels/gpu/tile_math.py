"""Backend-neutral tile math of the GPU kernels: plain ``jnp`` on values, never on refs.

Everything here runs inside a kernel on one tile (or in thin JAX around the kernels) and knows
nothing about Triton, so a Mosaic GPU variant of the kernels can call the same functions. The
per-entry math is ``cce_jax.loss_math`` and the tiling, online log-sum-exp and skip table are
``cce_jax.filtering`` (``docs/math.md``); this module adds how the GPU kernels resolve their
tiles and the few helpers only they need.

Tiling of an axis of ``size`` in blocks of ``block``:

* tokens (N): the "mask" policy, block ``i`` starts at ``i * block``; rows past N are masked on
  load and store (N may be smaller than a block).
* classes (V) and hidden units (D): the "overlap" policy, the last block starts early, at
  ``size - block``, so that every load is in bounds without a mask (``c`` is never padded, and
  a row gather needs no mask). This needs ``size >= block``, so these blocks are clamped to
  the largest power of two <= size, and size >= 16 is required.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cce_jax import filtering, loss_math
from cce_jax.filtering import AxisTiling
from cce_jax.options import LossOptions


def masked_axis(size: int, block: int) -> AxisTiling:
  """Tokens: blocks of ``block`` (shrunk to the next power of two >= max(size, 16)), the
  last one masked."""
  return AxisTiling(size, min(block, max(16, next_power_of_two(size))), "mask")


def overlapped_axis(size: int, block: int) -> AxisTiling:
  """Classes and hidden units: blocks of ``block`` clamped to the largest power of two <= size,
  the last one overlapping its predecessor. Requires ``size >= 16`` (checked by the caller)."""
  return AxisTiling(size, min(block, 1 << (size.bit_length() - 1)), "overlap")


def next_power_of_two(size: int) -> int:
  return 1 if size <= 1 else 1 << (size - 1).bit_length()


def masked_rows(i: jax.Array, axis: AxisTiling) -> tuple[jax.Array, jax.Array | None]:
  """(start, (block,) bool rows inside the axis or None when none is ever outside)."""
  start = axis.start(i)
  return start, axis.live(i, start)


def and_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical and of broadcastable masks, None standing for all True."""
  out = None
  for mask in masks:
    if mask is not None:
      out = mask if out is None else out & mask
  return out


def merge_partial_lse(max_SN: jax.Array, sum_SN: jax.Array) -> jax.Array:
  """The lse over all splits from per-split (max, sum of exp(z - max)), each (S, N) f32.

  A split whose classes are all masked (max ``-inf``, sum 0) adds nothing; a row masked in
  every split gets ``-inf``, not NaN.
  """
  peak = jnp.max(max_SN, axis=0)  # (N,)
  shift = filtering.exp_shift(peak)
  return shift + jnp.log(jnp.sum(sum_SN * jnp.exp(max_SN - shift[None, :]), axis=0))


def softmax_grad(
  z: jax.Array,  # (n, v) f32 soft-capped logits
  lse: jax.Array,  # (n,) f32
  is_target: jax.Array,  # (n, v) bool
  alpha: jax.Array,  # (n,) f32
  beta: jax.Array,  # (n,) f32
  gamma: jax.Array,  # (n,) f32
  valid: jax.Array | None,  # broadcastable to (n, v): real entries of the tile
  opts: LossOptions,
) -> jax.Array:
  """``dx_nv`` of a tile (``cce_jax.tiled.BackwardFn``'s rule), (n, v) f32, zero off ``valid``.

  The uniform label-smoothing term ``-gamma_n`` is inside the tile only with softcap; without
  softcap the caller adds it exactly outside the tiles.
  """
  coeffs = loss_math.TokenCoefficients(g=alpha, alpha=alpha, beta=beta, gamma=gamma)
  return loss_math.softmax_grad_tile(
    z, lse, is_target, coeffs, valid, opts, filtering.uniform_in_tile(opts)
  )
