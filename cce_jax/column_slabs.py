"""Reading and writing a (D, V) classifier by slabs of whole columns, never column by column.

A classifier of shape (D, V) (``classifier_layout="dv"``, a Flax ``Dense`` kernel) keeps V as
its minor (fastest-varying) dimension. Gathering or scattering single columns of it moves
single elements of every row, and XLA:TPU does that by transposing the whole of ``c`` into a
(V, D) temporary first: one more classifier in memory for every call. A slab of
:data:`SLAB_WIDTH` consecutive columns (one TPU lane width) is a contiguous, aligned piece of
every row: XLA:TPU gathers and updates such slabs in place. That holds when V is a whole
number of lanes (:func:`lane_aligned`; 256000, 128256); for another V (Llama 3's 128256 over 4
vocabulary shards is 32064) XLA:TPU stores a (D, V) array V-major already, where a column is
contiguous, and plain column gathers are the ones that need no copy. Everything here works on
any backend; only its memory matters to the TPU.

* :func:`column_rows`: the columns of given classes, as rows (the target logit's indexed dot);
* :func:`slab_order`: the vocabulary sort of ``cce_jax.vocab_sort`` by whole slabs;
* :func:`gather_slabs` and :func:`write_slabs`: a vocabulary tile of such an order, read from
  ``c`` and written into dC.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax import vma

SLAB_WIDTH = 128
"""Columns per slab: the TPU lane width (a (D, V) array is tiled 8 x 128 in HBM)."""

TOKEN_CHUNK = 32
"""Tokens per step of :func:`column_rows`: bounds its (tokens, D, slab) gather if a compiler
materializes it instead of fusing it into the selection."""


def _column_slabs(c: jax.Array, starts: jax.Array, width: int) -> jax.Array:
  """(k, D, width): the columns ``[starts[i], starts[i] + width)`` of ``c`` (D, V)."""
  index = jnp.stack([jnp.zeros_like(starts), starts], axis=1)  # (k, 2)
  dims = lax.GatherDimensionNumbers(
    offset_dims=(1, 2), collapsed_slice_dims=(), start_index_map=(0, 1)
  )
  return lax.gather(c, index, dims, slice_sizes=(c.shape[0], width), mode="clip")


def column_rows(c: jax.Array, class_ids: jax.Array) -> jax.Array:
  """(n, D): column ``class_ids[i]`` of ``c`` (D, V) as row ``i``, values and dtype of ``c``.

  The same values as ``c[:, class_ids].T``. With a :func:`lane_aligned` V, read as the slab
  holding each column (a select, so other columns' values, inf or NaN included, never leak
  in), ``TOKEN_CHUNK`` ids at a time; else by a plain gather of the columns.

  Args:
    c: (D, V) any dtype.
    class_ids: (n,) int, each in [0, V) (others are clamped into range).
  """
  hidden, num_classes = c.shape
  (n,) = class_ids.shape
  class_ids = jnp.clip(class_ids.astype(jnp.int32), 0, num_classes - 1)
  if not lane_aligned(num_classes):
    return jnp.take(c, class_ids, axis=1).T
  width = SLAB_WIDTH
  chunk = min(TOKEN_CHUNK, n)
  if chunk == 0:
    return jnp.zeros((0, hidden), c.dtype)

  def rows_of(ids):  # (k,) -> (k, D)
    starts = jnp.minimum(ids - ids % width, num_classes - width)
    slabs = _column_slabs(c, starts, width)  # (k, D, width)
    pick = (ids - starts)[:, None, None] == jnp.arange(width)[None, None, :]
    return jnp.sum(jnp.where(pick, slabs, jnp.zeros((), c.dtype)), axis=2, dtype=c.dtype)

  def step(i, rows):
    start = jnp.minimum(i * chunk, n - chunk)  # the last chunk overlaps: rewrites are exact
    ids = lax.dynamic_slice_in_dim(class_ids, start, chunk)
    return lax.dynamic_update_slice_in_dim(rows, rows_of(ids), start, 0)

  rows = vma.vary_like(jnp.zeros((n, hidden), c.dtype), c, class_ids)  # under shard_map
  return lax.fori_loop(0, -(-n // chunk), step, rows)


def lane_aligned(num_classes: int) -> bool:
  """Whether XLA:TPU keeps V as the minor axis of a (D, V) array, so that it must be read by
  slabs: V is a whole number of lanes. (For another V, with D a whole number of lanes, it
  stores the array V-major, where a column is contiguous and a slab is not.)"""
  return num_classes % SLAB_WIDTH == 0


def tile_slab_width(num_classes: int, vocab_block: int) -> int | None:
  """The slab width of a vocabulary of ``num_classes`` classes in ``vocab_block``-wide
  overlapped tiles (``cce_jax.filtering.overlapped``, the block clamped to the vocabulary)
  that follow a :func:`slab_order`: :data:`SLAB_WIDTH` when it divides both (every tile then
  starts at a slab), else None.

  Example:
    >>> from cce_jax.column_slabs import tile_slab_width
    >>> tile_slab_width(256000, 2048), tile_slab_width(128256, 2048)
    (128, 128)
    >>> tile_slab_width(128256 // 4, 2048) is None  # Llama 3's vocabulary over 4 shards
    True
  """
  block = min(vocab_block, num_classes)
  if lane_aligned(num_classes) and block % SLAB_WIDTH == 0:
    return SLAB_WIDTH
  return None


def slab_order(score: jax.Array, width: int) -> jax.Array:
  """(V,) int32: the classes by slab of ``width``, the slabs by descending best ``score``
  (stable), each slab's classes in their own order.

  Args:
    score: (V,) f32 per-class score (the average logit), V a multiple of ``width``.
    width: classes per slab.
  """
  (num_classes,) = score.shape
  slab_best = jnp.max(score.reshape(-1, width), axis=1)  # (V / width,)
  slabs = jnp.argsort(-slab_best, stable=True).astype(jnp.int32)
  order = slabs[:, None] * width + jnp.arange(width, dtype=jnp.int32)[None, :]
  return order.reshape(num_classes)


def gather_slabs(c: jax.Array, class_ids: jax.Array, width: int) -> jax.Array:
  """(D, v): the columns ``class_ids`` of ``c`` (D, V), read slab by slab.

  Args:
    c: (D, V).
    class_ids: (v,) int32, v a multiple of ``width``, a window of a :func:`slab_order` of
      ``width`` that starts at a slab: consecutive runs of ``width`` ids.
    width: classes per slab.
  """
  hidden = c.shape[0]
  starts = class_ids[::width]  # (v / width,) the first class of each slab
  slabs = _column_slabs(c, starts, width)  # (k, D, width)
  return jnp.moveaxis(slabs, 0, 1).reshape(hidden, class_ids.shape[0])


def write_slabs(
  d_c: jax.Array,  # (D, V)
  block: jax.Array,  # (D, v)
  class_ids: jax.Array,  # (v,) int32, as for gather_slabs
  fresh: jax.Array | None,  # (v,) bool, constant over each slab; None: all
  width: int,
) -> jax.Array:
  """``d_c`` with ``block``'s columns written at ``class_ids``, slabs of ``width``, in place; a
  slab whose columns are not ``fresh`` (an earlier tile wrote them) keeps its values."""
  starts = class_ids[::width]
  keep = None if fresh is None else fresh[::width]

  def write(k, d_c):
    new = lax.dynamic_slice_in_dim(block, k * width, width, axis=1)  # (D, width)
    if keep is not None:
      old = lax.dynamic_slice_in_dim(d_c, starts[k], width, axis=1)
      new = jnp.where(keep[k], new, old)
    return lax.dynamic_update_slice_in_dim(d_c, new, starts[k], axis=1)

  return lax.fori_loop(0, starts.shape[0], write, d_c)
