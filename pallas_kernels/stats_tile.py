r"""Backend-neutral tile math of the token-statistics forward (``cce_jax.token_stats``).

Plain ``jnp`` on values, run inside the GPU (Triton) and TPU (Mosaic) forward kernels on one
(token block, vocabulary block) tile of soft-capped logits, and outside them to merge the GPU
kernel's vocabulary splits. Per token the kernels keep a running maximum ``m``,
``s = sum_v exp(z_v - m)``, ``t = sum_v exp(z_v - m) (z_v - m)`` (both rescaled when ``m``
grows) and the argmax, so that

.. math::
  L = m + \log s, \qquad H = -\sum_v p_v \log p_v = L - \mathbb{E}_p[z] = \log s - t / s

is formed without cancelling against ``m``. A masked class (``-inf`` logit) adds 0 to ``s``
and to ``t`` (never ``0 * -inf``), so the entropy stays finite; a token without any finite
logit gets ``s = 0``, entropy 0, lse ``-inf`` and argmax 0 (``jnp.argmax`` of all ``-inf``).

The argmax is the lowest class id holding the maximum, whatever order the tiles come in: a
tile replaces the running argmax when its maximum is larger, or equal with a lower id.

Shapes: ``keepdims=True`` (the TPU kernels) keeps per-token vectors as (n, 1) columns;
``keepdims=False`` (the GPU kernels) as (n,).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cce_jax import filtering
from cce_jax.local_stats import entropy_from_sums, rescaled_sums


def _column(x: jax.Array, keepdims: bool) -> jax.Array:
  """A per-token vector as an (n, 1) column."""
  return x if keepdims else x[:, None]


def online_step(
  running_max: jax.Array,  # (n,) or (n, 1) f32
  s: jax.Array,  # (n,) or (n, 1) f32: sum exp(z - running_max) so far
  t: jax.Array,  # (n,) or (n, 1) f32: sum exp(z - running_max) (z - running_max) so far
  z_live: jax.Array,  # (n, v) f32 logits of one tile, -inf where not live
  keepdims: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Merges one tile into the running ``(max, s, t)``; returns them and the tile's row max,
  each f32 of the shape of ``running_max``."""
  tile_max = jnp.max(z_live, axis=1, keepdims=keepdims)
  new_max = jnp.maximum(running_max, tile_max)
  shift = filtering.exp_shift(new_max)  # 0 while every class so far is masked
  centered = z_live - _column(shift, keepdims)  # (n, v), -inf at masked classes
  p = jnp.exp(centered)  # 0 at masked classes
  tile_t = jnp.sum(jnp.where(p > 0.0, p * centered, 0.0), axis=1, keepdims=keepdims)
  s, t = rescaled_sums(s, t, running_max, shift)
  return new_max, s + jnp.sum(p, axis=1, keepdims=keepdims), t + tile_t, tile_max


def tile_argmax(
  z_live: jax.Array,  # (n, v) f32
  tile_max: jax.Array,  # (n,) or (n, 1) f32
  class_ids: jax.Array,  # broadcastable to (n, v), int32 or f32
  keepdims: bool,
) -> jax.Array:
  """The lowest class id of each row holding the tile's maximum, dtype of ``class_ids``."""
  ids = jnp.broadcast_to(class_ids, z_live.shape)
  integer = jnp.issubdtype(ids.dtype, jnp.integer)
  none = jnp.iinfo(ids.dtype).max if integer else jnp.inf
  hits = z_live == _column(tile_max, keepdims)
  return jnp.min(jnp.where(hits, ids, none), axis=1, keepdims=keepdims)


def pick_argmax(
  running_max: jax.Array, argmax: jax.Array, tile_max: jax.Array, tile_arg: jax.Array
) -> jax.Array:
  """The running argmax after a tile (``running_max`` from before it): the tile's when its
  maximum is larger, or equal with a lower class id; a tile of only ``-inf`` never wins."""
  finite = tile_max > -jnp.inf
  wins = (tile_max > running_max) | ((tile_max == running_max) & (tile_arg < argmax) & finite)
  return jnp.where(wins, tile_arg, argmax)


def merge_splits(
  max_SN: jax.Array,  # (S, N) f32 per-split running max
  s_SN: jax.Array,  # (S, N) f32
  t_SN: jax.Array,  # (S, N) f32
  argmax_SN: jax.Array,  # (S, N) int32: global class ids
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(lse, entropy, peak, argmax), each (N,), over S vocabulary splits of a row: a split
  whose classes are all masked adds nothing; the argmax is the lowest id of the splits that
  hold the overall maximum."""
  peak = jnp.max(max_SN, axis=0)  # (N,)
  shift = filtering.exp_shift(peak)
  s_SN, t_SN = rescaled_sums(s_SN, t_SN, max_SN, shift[None, :])  # 0 for a masked split
  s, t = jnp.sum(s_SN, axis=0), jnp.sum(t_SN, axis=0)
  candidates = jnp.where(max_SN == peak[None, :], argmax_SN, jnp.iinfo(jnp.int32).max)
  argmax = jnp.min(candidates, axis=0).astype(jnp.int32)
  lse = shift + jnp.log(s)
  return lse, entropy_from_sums(s, t), peak, argmax
