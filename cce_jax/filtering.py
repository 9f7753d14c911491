"""Gradient filtering and the tiling it works on, written once for every implementation.

What a tiled implementation shares with the others lives here; what varies by backend is only
the tiling *policy* of each axis (overlap or mask), the layout of the forward's block maxima,
and how its kernels read the skip table (a bool, an int32 or a packed bit per tile), which the
backend derives from :func:`skip_table` itself. The rule is ``docs/math.md``'s:

* **Tiling** (:class:`AxisTiling`): an axis of ``size`` cut into blocks of ``block``. With the
  ``"overlap"`` policy a ragged last block starts early, at ``size - block`` (every load in
  bounds, nothing padded), and the entries an earlier block covered are not *live*; with
  ``"mask"`` the last block runs past the end and the entries past ``size`` are not live.
* **Skip table** (:func:`skip_table`): (token blocks, vocab blocks) bool, True where the
  backward may skip a tile: no row of the tile has its target class among the tile's classes,
  and ``filter_scale_n * exp(block_max_nb - lse_n) < filter_eps`` for every row (the block
  maximum bounds every logit of the row in the block; NaN and inf never let a tile go).
* **Vocabulary order**: tiles visit classes in ``order`` (the vocabulary sort); the tile column
  of a class is the inverse permutation (:func:`positions`).
* **Uniform smoothing term** (:func:`uniform_outside`, :func:`uniform_terms`): without softcap
  the ``-gamma_n`` term of label smoothing is added exactly outside the tiles, so filtering can
  never drop it; with softcap it goes inside (:func:`uniform_in_tile`) and nothing is skipped.
* **Online log-sum-exp** (:func:`online_lse_step`; :func:`exp_shift` keeps it NaN-free when
  whole blocks are ``-inf``) and the operand dtype of the backward's products
  (:func:`product_dtype`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax.options import LossOptions

TilingPolicy = Literal["overlap", "mask"]


def cdiv(a: int, b: int) -> int:
  """``ceil(a / b)`` for ints, ``b > 0``."""
  return -(-a // b)


@dataclasses.dataclass(frozen=True)
class AxisTiling:
  """One axis of ``size`` entries cut into ``count`` blocks of ``block`` (static).

  Attributes:
    size: entries along the axis.
    block: entries per block (the implementation's resolved block size). ``"overlap"`` needs
      ``block <= size``; ``"mask"`` allows a block larger than the axis.
    policy: ``"overlap"``: block ``i`` starts at ``min(i * block, size - block)``;
      ``"mask"``: at ``i * block``, the entries past ``size`` masked.

  Raises:
    ValueError: a block that is not positive, or an overlapped block larger than the axis.
  """

  size: int
  block: int
  policy: TilingPolicy

  def __post_init__(self):
    if self.block <= 0 or (self.policy == "overlap" and self.block > self.size):
      raise ValueError(
        f"AxisTiling: block={self.block} does not tile size={self.size} with policy "
        f"{self.policy!r} (overlapped blocks need 1 <= block <= size)."
      )

  @property
  def count(self) -> int:
    """The number of blocks."""
    return cdiv(self.size, self.block)

  @property
  def ragged(self) -> bool:
    """Whether ``size`` is not a whole number of blocks (the last block is special)."""
    return self.size % self.block != 0

  def start(self, i: jax.Array) -> jax.Array:
    """() int32: the first entry of block ``i``."""
    if self.policy == "overlap":
      return jnp.minimum(i * self.block, self.size - self.block)
    return i * self.block

  def live(self, i: jax.Array, start: jax.Array) -> jax.Array | None:
    """(block,) bool: the entries of block ``i`` (starting at ``start``) that count here: with
    "overlap" those no earlier block covered, with "mask" those inside the axis. None when the
    axis is not ragged (every entry counts), so that callers skip the masking."""
    if not self.ragged:
      return None
    index = start + lax.iota(jnp.int32, self.block)
    if self.policy == "overlap":
      return index >= i * self.block
    return index < self.size


def overlapped(size: int, block: int) -> AxisTiling:
  """``size`` in overlapped blocks of ``block`` clamped to ``[1, size]``."""
  return AxisTiling(size, max(1, min(block, size)), "overlap")


def positions(order: jax.Array) -> jax.Array:
  """(V,) int32: the position of each class in ``order``, the inverse permutation."""
  num_classes = order.shape[0]
  return (
    jnp.zeros((num_classes,), jnp.int32).at[order].set(jnp.arange(num_classes, dtype=jnp.int32))
  )


def tile_columns(local_labels: jax.Array, order: jax.Array | None) -> jax.Array:
  """(N,) int32: the position of each token's target class in the visiting ``order`` (the
  identity when None), -1 where ``local_labels`` is -1."""
  if order is None:
    return local_labels
  return jnp.where(local_labels >= 0, positions(order)[jnp.maximum(local_labels, 0)], -1)


def skip_table(
  block_max: jax.Array,  # (vocab blocks, N) or (N, vocab blocks) f32
  lse: jax.Array,  # (N,) f32
  filter_scale: jax.Array,  # (N,) f32
  local_labels: jax.Array,  # (N,) int32, -1 for none
  order: jax.Array | None,  # (V,) int32 visiting order of the classes; None: the identity
  tokens: AxisTiling,
  classes: AxisTiling,
  filter_eps: float,
  block_max_token_axis: int,
) -> jax.Array:
  """(token blocks, vocab blocks) bool: True where the backward may skip the tile.

  ``block_max`` holds, per token and vocabulary block, the largest logit over the block's live
  classes, with its token axis at ``block_max_token_axis`` (0 or 1). A tile covers the rows
  of its token block (with "overlap", the last block's rows that its predecessor also covers
  count for it too) and the live classes of its vocabulary block. A tile is skipped iff no
  row's target lies among those classes and ``filter_scale * exp(block_max - lse) <
  filter_eps`` for every row; NaN or inf in any row keeps the tile.
  """
  axis = block_max_token_axis  # the layout is kept: no transposed copy of the N x B maxima
  per_token = lambda x: jnp.expand_dims(x, 1 - axis)  # (N,) -> broadcastable to block_max
  bound = per_token(filter_scale) * jnp.exp(block_max - per_token(lse))  # (N, B) or (B, N)
  # The rows i * block .. (i + 1) * block - 1 of every block, padded rows bounded by 0.
  padding = [(0, 0), (0, 0)]
  padding[axis] = (0, tokens.count * tokens.block - tokens.size)
  rows = jnp.pad(bound, padding)
  if axis == 0:
    tile_bound = jnp.max(rows.reshape(tokens.count, tokens.block, -1), axis=1)  # (T, B)
  else:
    tile_bound = jnp.max(rows.reshape(-1, tokens.count, tokens.block), axis=2).T  # (T, B)
  if tokens.policy == "overlap" and tokens.ragged:
    # The last block starts early: its rows are the last `block` ones.
    last_rows = lax.slice_in_dim(bound, tokens.size - tokens.block, tokens.size, axis=axis)
    tile_bound = tile_bound.at[-1].set(jnp.max(last_rows, axis=axis))
  small = tile_bound < filter_eps  # (T, B); NaN compares False: kept
  # The vocabulary block whose live classes hold each row's target; past the end for none.
  columns = tile_columns(local_labels, order)
  target_block = jnp.where(columns >= 0, columns // classes.block, classes.count)
  token_block = jnp.arange(tokens.size, dtype=jnp.int32) // tokens.block
  holds_target = jnp.zeros((tokens.count, classes.count + 1), bool)
  holds_target = holds_target.at[token_block, target_block].set(True)
  if tokens.policy == "overlap" and tokens.ragged:
    holds_target = holds_target.at[-1, target_block[tokens.size - tokens.block :]].set(True)
  return small & ~holds_target[:, : classes.count]


def uniform_in_tile(opts: LossOptions) -> bool:
  """Whether the uniform smoothing term ``-gamma_n`` goes inside the tiles (softcap with
  label smoothing: it is scaled by every entry's softcap derivative)."""
  return opts.label_smoothing > 0.0 and opts.softcap is not None


def uniform_outside(opts: LossOptions) -> bool:
  """Whether the uniform smoothing term is added exactly outside the tiles (no softcap)."""
  return opts.label_smoothing > 0.0 and opts.softcap is None


class UniformTerms(NamedTuple):
  """The exact uniform smoothing term outside the tiles, all f32.

  ``dE_n -= gamma_n * class_sum``, ``dC_v -= weighted_e``, ``db_v -= gamma_sum``.

  Attributes:
    class_sum: (D,) ``sum_v c_v``.
    weighted_e: (D,) ``sum_n gamma_n e_n``.
    gamma_sum: () ``sum_n gamma_n``.
  """

  class_sum: jax.Array
  weighted_e: jax.Array
  gamma_sum: jax.Array


def uniform_terms(
  e: jax.Array,  # (N, D)
  c: jax.Array,  # (V, D) or (D, V)
  gamma: jax.Array,  # (N,) f32
  opts: LossOptions,
) -> UniformTerms:
  """The three vectors of the exact uniform smoothing term (see :class:`UniformTerms`)."""
  f32 = jnp.float32
  return UniformTerms(
    class_sum=jnp.sum(c, axis=opts.vocab_dim, dtype=f32),
    weighted_e=jnp.dot(gamma.astype(f32), e.astype(f32), precision=lax.Precision.HIGHEST),
    gamma_sum=jnp.sum(gamma.astype(f32)),
  )


def exp_shift(peak: jax.Array) -> jax.Array:
  """The offset subtracted before ``exp`` in a log-sum-exp: ``peak``, or 0 where ``peak`` is
  ``-inf`` (every entry masked, e.g. a ``-inf`` bias over a whole vocabulary block or shard),
  so that ``exp(-inf - shift)`` is 0 rather than ``exp(-inf + inf) = NaN``. Same shape."""
  return jnp.where(peak == -jnp.inf, 0.0, peak)


def online_lse_step(
  running_max: jax.Array,  # (n,) f32
  running_sum: jax.Array,  # (n,) f32: sum of exp(z - running_max) so far
  z: jax.Array,  # (n, v) f32 logits of one tile
  live: jax.Array | None,  # broadcastable to (n, v) bool: the tile's live classes; None: all
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Merges one tile into a running log-sum-exp; returns (max, sum, tile row max), (n,) f32.

  Masked classes (``-inf`` logits) add nothing, also when every class seen so far is masked:
  the max stays ``-inf`` and the sum 0 (see :func:`exp_shift`), so the final
  ``max + log(sum)`` is ``-inf`` only for a row without any finite logit.
  """
  z_live = z if live is None else jnp.where(live, z, -jnp.inf)
  tile_max = jnp.max(z_live, axis=1)
  new_max = jnp.maximum(running_max, tile_max)
  shift = exp_shift(new_max)
  new_sum = running_sum * jnp.exp(running_max - shift) + jnp.sum(
    jnp.exp(z_live - shift[:, None]), axis=1
  )
  return new_max, new_sum, tile_max


def product_dtype(dtype) -> jnp.dtype:
  """Operand dtype of the backward's two products: bfloat16 stays bfloat16 (f32 accumulation);
  every other dtype multiplies in float32 (float16 because the softmax gradient scaled by 1/N
  underflows its range)."""
  dtype = jnp.dtype(dtype)
  return dtype if dtype == jnp.bfloat16 else jnp.dtype(jnp.float32)
