"""Backend-neutral tile math of the GPU kernels: plain ``jnp`` on values, never on refs.

Everything here runs inside a kernel on one tile (or in thin JAX around the kernels) and knows
nothing about Triton, so a Mosaic GPU variant of the kernels can call the same functions. The
per-entry math itself is ``cce_jax.loss_math`` (``docs/math.md``); this module adds the
tiling: which entries of a block are real, the online log-sum-exp, and the skip table.

Tiling of an axis of ``size`` in blocks of ``block``:

* tokens (N): block ``i`` starts at ``i * block``; rows past N are masked on load and store
  (N may be smaller than a block).
* classes (V) and hidden units (D): the last block starts early, at ``size - block``, so that
  every load is in bounds without a mask (``c`` is never padded, and a row gather needs no
  mask); the entries an earlier block already covered are not "fresh" and are masked out of
  the math. This needs ``size >= block``, so these blocks are clamped to the largest power of
  two <= size, and size >= 16 is required.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax import loss_math
from cce_jax.options import LossOptions


class Axis(NamedTuple):
  """One axis cut into ``count`` blocks of ``block`` (static)."""

  size: int
  block: int
  count: int

  @property
  def ragged(self) -> bool:
    return self.size % self.block != 0


def masked_axis(size: int, block: int) -> Axis:
  """Tokens: blocks of ``block`` (shrunk to the next power of two >= max(size, 16)), the
  last one masked."""
  block = min(block, max(16, next_power_of_two(size)))
  return Axis(size, block, -(-size // block))


def overlapped_axis(size: int, block: int) -> Axis:
  """Classes and hidden units: blocks of ``block`` clamped to the largest power of two <= size,
  the last one overlapping its predecessor. Requires ``size >= 16`` (checked by the caller)."""
  block = min(block, 1 << (size.bit_length() - 1))
  return Axis(size, block, -(-size // block))


def next_power_of_two(size: int) -> int:
  return 1 if size <= 1 else 1 << (size - 1).bit_length()


def masked_rows(i: jax.Array, axis: Axis) -> tuple[jax.Array, jax.Array | None]:
  """(start, (block,) bool rows inside the axis or None when none is ever outside)."""
  start = i * axis.block
  if not axis.ragged:
    return start, None
  return start, start + lax.iota(jnp.int32, axis.block) < axis.size


def overlapped_start(k: jax.Array, axis: Axis) -> jax.Array:
  """Start of block ``k`` of an overlapped axis: ``min(k * block, size - block)``."""
  return jnp.minimum(k * axis.block, axis.size - axis.block)


def fresh(k: jax.Array, start: jax.Array, axis: Axis) -> jax.Array | None:
  """(block,) bool: the entries of overlapped block ``k`` no earlier block covered; None when
  the axis is a whole number of blocks (every entry is fresh)."""
  if not axis.ragged:
    return None
  return start + lax.iota(jnp.int32, axis.block) >= k * axis.block


def and_masks(*masks: jax.Array | None) -> jax.Array | None:
  """Logical and of broadcastable masks, None standing for all True."""
  out = None
  for mask in masks:
    if mask is not None:
      out = mask if out is None else out & mask
  return out


def online_lse_step(
    running_max: jax.Array,  # (n,) f32
    running_sum: jax.Array,  # (n,) f32: sum of exp(z - running_max) so far
    z: jax.Array,  # (n, v) f32 logits of one tile
    live: jax.Array | None,  # (1, v) bool: the tile's fresh classes; None for all
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Merges one tile into a running log-sum-exp; returns (max, sum, tile row max), (n,) f32."""
  z_live = z if live is None else jnp.where(live, z, -jnp.inf)
  tile_max = jnp.max(z_live, axis=1)
  new_max = jnp.maximum(running_max, tile_max)
  new_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
      jnp.exp(z_live - new_max[:, None]), axis=1
  )
  return new_max, new_sum, tile_max


def merge_partial_lse(max_SN: jax.Array, sum_SN: jax.Array) -> jax.Array:
  """The lse over all splits from per-split (max, sum of exp(z - max)), each (S, N) f32."""
  peak = jnp.max(max_SN, axis=0)  # (N,)
  return peak + jnp.log(jnp.sum(sum_SN * jnp.exp(max_SN - peak[None, :]), axis=0))


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
  """``dx_nv`` of a tile (``cce_jax.tiled``'s backward rule), (n, v) f32, zero off ``valid``.

  The uniform label-smoothing term ``-gamma_n`` is inside the tile only with softcap; without
  softcap the caller adds it exactly outside the tiles.
  """
  coeffs = loss_math.TokenCoefficients(g=alpha, alpha=alpha, beta=beta, gamma=gamma)
  return loss_math.softmax_grad_tile(
      z, lse, is_target, coeffs, valid, opts, uniform_in_tile(opts)
  )


def uniform_in_tile(opts: LossOptions) -> bool:
  """Whether the uniform smoothing term goes inside the tiles (softcap and smoothing)."""
  return opts.label_smoothing > 0.0 and opts.softcap is not None


def uniform_outside(opts: LossOptions) -> bool:
  """Whether the uniform smoothing term is added exactly outside the tiles (no softcap)."""
  return opts.label_smoothing > 0.0 and opts.softcap is None


def skip_table(
    block_max: jax.Array,  # (vocab blocks, N) f32: max_v z_nv over each block's fresh classes
    lse: jax.Array,  # (N,) f32
    filter_scale: jax.Array,  # (N,) f32
    labels: jax.Array,  # (N,) int32 local labels, -1 for none
    order: jax.Array | None,  # (V,) int32 class order of the blocks; None for the identity
    tokens: Axis,
    classes: Axis,
    filter_eps: float,
) -> jax.Array:
  """(token blocks, vocab blocks) int32: 1 where the backward skips the tile.

  ``cce_jax.tiled``'s rule: no row of the tile has its label among the tile's classes and
  ``filter_scale_n * exp(z_nv - lse_n) < filter_eps`` for every entry, here checked through the
  block maxima (``exp`` is increasing). NaN or inf anywhere in a tile's rows keeps it.
  """
  bound = filter_scale[None, :] * jnp.exp(block_max - lse[None, :])  # (B, N)
  padded = tokens.count * tokens.block - tokens.size
  bound = jnp.pad(bound, ((0, 0), (0, padded)))  # padded rows: 0, never keep a tile
  tile_bound = jnp.max(bound.reshape(classes.count, tokens.count, tokens.block), axis=2)
  keep = ~(tile_bound < filter_eps)  # NaN compares False: kept
  if order is None:
    position = labels
  else:
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    position = inverse[jnp.maximum(labels, 0)]
  # The block whose fresh classes hold the label (the last block starts early but its
  # overlapping classes belong to its predecessor); a row without a label points past the end.
  target_block = jnp.where(labels >= 0, position // classes.block, classes.count)
  token_block = jnp.arange(tokens.size, dtype=jnp.int32) // tokens.block
  holds_target = jnp.zeros((classes.count + 1, tokens.count), bool)
  holds_target = holds_target.at[target_block, token_block].set(True)[: classes.count]
  return (~(keep | holds_target)).T.astype(jnp.int32)
