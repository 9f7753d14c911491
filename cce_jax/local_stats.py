r"""Per-token softmax statistics over the classes one device holds, and their backward.

The local half of :func:`cce_jax.token_stats` (``cce_jax.stats`` combines the halves over a
vocabulary-sharded mesh axis and forms the public fields). For token ``n`` over the local
classes ``v`` (soft-capped logits ``z_nv`` as in ``loss_math.capped_logits``):

.. math::
  L_n = \log \sum_v e^{z_{nv}}, \quad p_{nv} = e^{z_{nv} - L_n}, \quad
  H_n = -\sum_{v: p_{nv} > 0} p_{nv} \log p_{nv},

the target logit ``z_{n t_n}``, and the first (lowest class id) largest logit and its value.
Two implementations, registered in :data:`IMPLEMENTATIONS`:

* ``"xla"``: one pass over the vocabulary per block of tokens, in the tiles of
  ``cce_jax.xla_chunked`` (overlapped ragged blocks, nothing padded). Per token it keeps a
  running maximum ``m``, ``s = sum exp(z - m)`` and ``t = sum exp(z - m) (z - m)`` (rescaled
  when ``m`` grows), so that ``H = log s - t / s`` is formed without cancelling against ``m``;
  and a running argmax that a later block replaces only with a strictly larger maximum. Each
  tile is read by three fused reductions (sub-block maxima for the max and argmax, ``s``,
  ``t``) and no temporary of its size is written. Nothing of size N x V is allocated. On CPU
  the forward's default tiles are :data:`CPU_FORWARD_TILES`.
* ``"reference"``: the materialized (N, V) f32 logits.

The backward (:func:`xla_backward`, :func:`reference_backward`) takes the cotangents
``a_n, b_n, c_n`` of ``L_n``, ``H_n`` and the target logit and forms, per entry,

.. math::
  dz_{nv} = a_n p_{nv} - b_n p_{nv} (\log p_{nv} + H_n) + c_n [v = t_n]

(0 where ``p_nv`` is 0: a masked class), times the softcap derivative; then the products of
``dE``, ``dC`` and the bias gradient as the loss's backward (``docs/math.md``). No tile is
skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cce_jax import filtering, loss_math, tile_dot, vma, xla_chunked
from cce_jax.block_sizes import BlockSizes
from cce_jax.options import LossOptions
from cce_jax.tiled import LocalGrads, TiledInputs


class LocalStats(NamedTuple):
  """Per-token statistics over the local classes, each (N,).

  Attributes:
    lse: f32 ``log sum_v exp(z_nv)``; -inf for a token without a finite logit.
    entropy: f32 entropy of the local softmax; 0 for a token without a finite logit.
    target: f32 ``z_{n, local_labels[n]}`` (by an indexed dot), 0 where the label is -1.
    peak: f32 the largest local logit.
    argmax: int32 the lowest local class id holding ``peak`` (0 when every logit is -inf,
      like ``jnp.argmax``).
  """

  lse: jax.Array
  entropy: jax.Array
  target: jax.Array
  peak: jax.Array
  argmax: jax.Array


class StatsCotangents(NamedTuple):
  """The cotangents of the differentiable fields of :class:`LocalStats`, each (N,) f32."""

  lse: jax.Array
  entropy: jax.Array
  target: jax.Array


def stats_grad_tile(
  z: jax.Array,  # (n, v) f32 soft-capped logits
  lse: jax.Array,  # (n,) f32, exp_shift-ed: 0 where the local lse is -inf
  entropy: jax.Array,  # (n,) f32
  is_target: jax.Array,  # (n, v) bool
  cot: StatsCotangents,  # of the n tokens
  valid: jax.Array | None,  # (n, v) bool, or None for all
  opts: LossOptions,
) -> jax.Array:
  r"""The gradient w.r.t. the raw logits of a tile, (n, v) f32:

  .. math::
    dx_{nv} = \bigl(a_n p_{nv} - b_n p_{nv} (\log p_{nv} + H_n) + c_n [v = t_n]\bigr)
      \left(1 - (z_{nv} / s)^2\right)

  with 0 in place of ``p log p`` where ``p`` is 0 (a ``-inf`` logit), and 0 outside ``valid``.
  """
  log_p = z - lse[:, None]
  p = jnp.exp(log_p)
  safe_log_p = jnp.where(p > 0.0, log_p, 0.0)  # -inf at a masked class, where p is 0
  dz = p * (cot.lse[:, None] - cot.entropy[:, None] * (safe_log_p + entropy[:, None]))
  dz = dz + jnp.where(is_target, cot.target[:, None], 0.0)
  if valid is not None:
    dz = jnp.where(valid, dz, 0.0)
  return dz * loss_math.softcap_derivative(z, opts.softcap)


# ---- "xla": one streamed pass over vocabulary tiles ------------------------------------------


# Widest sub-block of a tile's columns whose maxima locate its argmax (_tile_max_argmax).
ARGMAX_SUB_BLOCK = 128
# Floor of the centered logits in the entropy numerator: exp(-256) is exactly 0 in f32, so the
# floor changes no term, and a -inf logit (a masked class) adds 0 * -256 = 0, never 0 * -inf.
_CENTERED_FLOOR = -256.0


def rescaled_sums(
  s: jax.Array, t: jax.Array, old_max: jax.Array, new_shift: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The running sums ``s = sum exp(z - m)`` and ``t = sum exp(z - m) (z - m)`` of one row
  moved from the shift ``old_max`` to ``new_shift`` (same shapes, f32): ``exp(m - m') s`` and
  ``exp(m - m') (t + s (m - m'))``. Nothing is moved (and ``-inf - m``, a NaN source, never
  formed) while ``s`` is 0. Shared by every token-statistics forward and the GPU kernel's
  merge of its vocabulary splits."""
  rescale = jnp.exp(old_max - new_shift)
  moved = jnp.where(s > 0.0, s * (old_max - new_shift), 0.0)
  return rescale * s, rescale * (t + moved)


def entropy_from_sums(s: jax.Array, t: jax.Array) -> jax.Array:
  """The softmax entropy ``log s - t / s`` from a row's sums (:func:`rescaled_sums`), 0 where
  ``s`` is 0 (no finite logit)."""
  has_mass = s > 0.0
  safe_s = jnp.where(has_mass, s, 1.0)
  return jnp.where(has_mass, jnp.log(safe_s) - t / safe_s, 0.0)


def _sub_block_width(num_columns: int) -> int:
  """The largest power of two <= ARGMAX_SUB_BLOCK dividing ``num_columns`` (1 when odd)."""
  width = ARGMAX_SUB_BLOCK
  while num_columns % width:
    width //= 2
  return width


def _tile_max_argmax(z: jax.Array, first_class: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Row maxima (n,) f32 of an (n, v) tile and the lowest class id holding each, (n,) int32
  (``first_class`` + column; ``first_class`` for a row of -inf logits).

  One pass over the tile: the maxima of sub-blocks of ``_sub_block_width(v)`` columns; the
  row maximum and its first sub-block come from those (n, v / w) maxima, and the column from
  the w entries of that sub-block (a gather of n x w). No (n, v) select or index array is
  formed: XLA:CPU materialized one and reduced it in a separate, slow loop.
  """
  num_rows, num_columns = z.shape
  width = _sub_block_width(num_columns)
  blocks = z.reshape(num_rows, num_columns // width, width)  # (n, v / w, w)
  # The barrier keeps the row max reading the (n, v / w) maxima: XLA would otherwise fold the
  # two reductions into a second pass over the whole tile.
  block_max = lax.optimization_barrier(jnp.max(blocks, axis=2))  # (n, v / w)
  tile_max = jnp.max(block_max, axis=1)  # (n,)
  block_ids = lax.broadcasted_iota(jnp.int32, block_max.shape, 1)
  last_block = num_columns // width - 1
  first_block = jnp.min(jnp.where(block_max == tile_max[:, None], block_ids, last_block), axis=1)
  entries = jnp.take_along_axis(blocks, first_block[:, None, None], axis=1)[:, 0]  # (n, w)
  columns = lax.broadcasted_iota(jnp.int32, entries.shape, 1)
  column = jnp.min(jnp.where(entries == tile_max[:, None], columns, width - 1), axis=1)
  return tile_max, first_class + first_block * width + column


def online_stats_step(state, z: jax.Array, first_class: jax.Array):
  """Merges one (n, v) tile of logits (non-live entries already -inf) whose first column is
  class ``first_class`` into the running (max, s, t, argmax).

  Per entry, three reductions read the tile: the sub-block maxima (``_tile_max_argmax``),
  ``sum exp(z - m)`` and ``sum exp(z - m) (z - m)``. The last two are written as two separate
  expressions of ``z`` (``z - m`` and ``z + (-m)``, equal in IEEE arithmetic), so that no
  (n, v) intermediate is shared: XLA:CPU then fuses each whole chain into its reduction and
  never writes an (n, v) temporary (a shared ``exp`` or ``z - m`` was materialized, and cost
  more than computing the exp twice).
  """
  running_max, s, t, argmax = state
  tile_max, tile_argmax = _tile_max_argmax(z, first_class)
  new_max = jnp.maximum(running_max, tile_max)
  shift = filtering.exp_shift(new_max)  # (n,)
  tile_s = jnp.sum(jnp.exp(z - shift[:, None]), axis=1)  # 0 at -inf logits
  centered = jnp.maximum(z + (-shift)[:, None], _CENTERED_FLOOR)  # (n, v)
  tile_t = jnp.sum(jnp.exp(centered) * centered, axis=1)
  s, t = rescaled_sums(s, t, running_max, shift)
  s, t = s + tile_s, t + tile_t
  # A later block (higher class ids) wins only with a strictly larger maximum.
  argmax = jnp.where(tile_max > running_max, tile_argmax, argmax)
  return new_max, s, t, argmax


def xla_forward(inputs: TiledInputs, opts: LossOptions) -> LocalStats:
  """:class:`LocalStats` in one pass over the vocabulary tiles of ``opts.block_sizes``."""
  e, c, local_labels, bias = inputs  # (N, D), (V, D) or (D, V), (N,), (V,) or None
  axis = opts.vocab_dim
  tok, voc = xla_chunked.tilings(e.shape[0], c.shape[axis], opts)
  upcast = tile_dot.upcasts_16bit(e, c)

  def token_step(i, carry):
    t0 = tok.start(i)
    e_blk = lax.dynamic_slice_in_dim(e, t0, tok.block)  # (n, D)
    labels_blk = lax.dynamic_slice_in_dim(local_labels, t0, tok.block)
    target = loss_math.target_logits(e_blk, c, labels_blk, bias, opts)

    def vocab_step(j, state):
      v0 = voc.start(j)
      c_blk = lax.dynamic_slice_in_dim(c, v0, voc.block, axis)
      bias_blk = None if bias is None else lax.dynamic_slice_in_dim(bias, v0, voc.block)
      z = loss_math.capped_logits(e_blk, c_blk, bias_blk, opts, upcast)  # (n, v) f32
      live = voc.live(j, v0)  # classes an earlier (overlapped) block did not cover
      if live is not None:
        z = jnp.where(live[None, :], z, -jnp.inf)
      return online_stats_step(state, z, v0)

    zeros = jnp.zeros((tok.block,), jnp.float32)
    init = (jnp.full((tok.block,), -jnp.inf, jnp.float32), zeros, zeros)
    init = (*init, jnp.zeros((tok.block,), jnp.int32))
    init = vma.vary_like(init, e, c, bias)
    peak, s, t, argmax = lax.fori_loop(0, voc.count, vocab_step, init)
    block = LocalStats(peak + jnp.log(s), entropy_from_sums(s, t), target, peak, argmax)
    # Rows shared with the previous (overlapped) block are recomputed identically.
    return jax.tree.map(lambda acc, x: lax.dynamic_update_slice_in_dim(acc, x, t0, 0), carry, block)

  num_tokens = e.shape[0]
  f32 = jnp.zeros((num_tokens,), jnp.float32)
  init = LocalStats(f32, f32, f32, f32, jnp.zeros((num_tokens,), jnp.int32))
  init = vma.vary_like(init, e, c, bias)
  return lax.fori_loop(0, tok.count, token_step, init)


def xla_backward(
  inputs: TiledInputs,
  lse: jax.Array,  # (N,) f32, exp_shift-ed
  entropy: jax.Array,  # (N,) f32
  cot: StatsCotangents,
  opts: LossOptions,
) -> LocalGrads:
  """dE (N, D) f32, dC (layout and dtype of ``c``) and the bias gradient (V,) f32, tile by
  tile: for each vocabulary block, for each token block, recompute the logits, form
  :func:`stats_grad_tile` and accumulate ``dE += dX @ C`` and ``dC_block += dX.T @ E``."""
  e, c, local_labels, bias = inputs
  num_tokens, hidden = e.shape
  axis = opts.vocab_dim
  tok, voc = xla_chunked.tilings(num_tokens, c.shape[axis], opts)
  product_dtype = filtering.product_dtype(e.dtype)
  upcast = tile_dot.upcasts_16bit(e, c)
  block_shape_c = (voc.block, hidden) if axis == 0 else (hidden, voc.block)

  def vocab_step(j, carry):
    d_e, d_c, d_bias = carry
    v0 = voc.start(j)
    c_blk = lax.dynamic_slice_in_dim(c, v0, voc.block, axis)
    c_product = c_blk.astype(product_dtype)
    bias_blk = None if bias is None else lax.dynamic_slice_in_dim(bias, v0, voc.block)
    class_ids = v0 + lax.iota(jnp.int32, voc.block)
    live_v = voc.live(j, v0)

    def token_step(i, inner):
      d_e, d_c_blk, d_bias_blk = inner
      t0 = tok.start(i)
      rows = lambda x: lax.dynamic_slice_in_dim(x, t0, tok.block)
      e_blk = rows(e)  # (n, D)
      z = loss_math.capped_logits(e_blk, c_blk, bias_blk, opts, upcast)  # (n, v) f32
      is_target = rows(local_labels)[:, None] == class_ids[None, :]
      valid = xla_chunked.outer_and(tok.live(i, t0), live_v)  # (n, v) or None
      dx = stats_grad_tile(
        z, rows(lse), rows(entropy), is_target, jax.tree.map(rows, cot), valid, opts
      )
      if d_bias_blk is not None:
        d_bias_blk = d_bias_blk + jnp.sum(dx, axis=0)
      dx = dx.astype(product_dtype)
      d_rows = rows(d_e) + xla_chunked.grad_e_tile(dx, c_product, axis, upcast)
      d_c_blk = d_c_blk + xla_chunked.grad_c_tile(dx, e_blk.astype(product_dtype), axis, upcast)
      return lax.dynamic_update_slice_in_dim(d_e, d_rows, t0, 0), d_c_blk, d_bias_blk

    init = (
      d_e,
      jnp.zeros(block_shape_c, jnp.float32),
      None if bias is None else jnp.zeros((voc.block,), jnp.float32),
    )
    init = vma.vary_like(init, e, c, bias, cot)
    d_e, d_c_blk, d_bias_blk = lax.fori_loop(0, tok.count, token_step, init)
    # Classes an earlier block covered got zeros in this one (not live): adding is exact.
    old = xla_chunked.to_storage(lax.dynamic_slice_in_dim(d_c, v0, voc.block, axis), c.dtype)
    new = xla_chunked.to_storage((old + d_c_blk).astype(c.dtype), d_c.dtype)
    d_c = lax.dynamic_update_slice_in_dim(d_c, new, v0, axis)
    if d_bias is not None:
      old_bias = lax.dynamic_slice_in_dim(d_bias, v0, voc.block)
      d_bias = lax.dynamic_update_slice_in_dim(d_bias, old_bias + d_bias_blk, v0, 0)
    return d_e, d_c, d_bias

  init = (
    jnp.zeros((num_tokens, hidden), jnp.float32),
    jnp.zeros(c.shape, xla_chunked.grad_c_storage(c, upcast)),  # bits while blocks are written
    None if bias is None else jnp.zeros((c.shape[axis],), jnp.float32),
  )
  init = vma.vary_like(init, e, c, bias, cot)
  d_e, d_c, d_bias = lax.fori_loop(0, voc.count, vocab_step, init)
  return LocalGrads(d_e=d_e, d_c=xla_chunked.to_storage(d_c, c.dtype), d_bias=d_bias)


# ---- "reference": the materialized logits ---------------------------------------------------


def reference_forward(inputs: TiledInputs, opts: LossOptions) -> LocalStats:
  """:class:`LocalStats` from the materialized (N, V) f32 logits."""
  e, c, local_labels, bias = inputs
  z = loss_math.capped_logits(e, c, bias, opts)  # (N, V) f32
  lse = jax.nn.logsumexp(z, axis=-1)
  log_p = z - filtering.exp_shift(lse)[:, None]
  p = jnp.exp(log_p)
  entropy = -jnp.sum(jnp.where(p > 0.0, p * log_p, 0.0), axis=-1)
  target = jnp.take_along_axis(z, jnp.maximum(local_labels, 0)[:, None], axis=-1)[:, 0]
  return LocalStats(
    lse=lse,
    entropy=entropy,
    target=jnp.where(local_labels >= 0, target, 0.0),
    peak=jnp.max(z, axis=-1),
    argmax=jnp.argmax(z, axis=-1).astype(jnp.int32),
  )


def reference_backward(
  inputs: TiledInputs, lse: jax.Array, entropy: jax.Array, cot: StatsCotangents, opts: LossOptions
) -> LocalGrads:
  """The gradients of :func:`xla_backward` from the materialized (N, V) tile."""
  e, c, local_labels, bias = inputs
  z = loss_math.capped_logits(e, c, bias, opts)  # (N, V) f32
  is_target = local_labels[:, None] == jnp.arange(z.shape[1], dtype=jnp.int32)[None, :]
  dx = stats_grad_tile(z, lse, entropy, is_target, cot, None, opts)  # (N, V)
  f32, exact = jnp.float32, lax.Precision.HIGHEST
  c32 = c.astype(f32)
  d_e = jnp.matmul(dx, c32 if opts.vocab_dim == 0 else c32.T, precision=exact)  # (N, D)
  d_c = jnp.matmul(dx.T, e.astype(f32), precision=exact)  # (V, D)
  if opts.vocab_dim == 1:
    d_c = d_c.T
  d_bias = None if bias is None else jnp.sum(dx, axis=0)
  return LocalGrads(d_e=d_e, d_c=d_c.astype(c.dtype), d_bias=d_bias)


# (token_block, vocab_block) of the "xla" forward on CPU when no block_sizes is given, per
# input bits, timed against the xla loss forward with two threads (benchmarks/speed.py's
# xla-stats row; RESULTS.md, 2026-11-30). The forward is one streamed pass: tall tiles keep
# XLA:CPU's products efficient (2048 x 512 f32 replaced 1024 x 256, which had been picked in
# single-threaded runs), and a 4 MB f32 tile is half the loss's (1024 x 2048).
CPU_FORWARD_TILES = {16: (1024, 512), 32: (2048, 512)}


def forward_block_sizes(dtype, platform: str) -> BlockSizes | None:
  """The default tiles of the ``"xla"`` statistics forward for inputs of ``dtype`` compiled
  for ``platform``: ``CPU_FORWARD_TILES`` on ``"cpu"``; None elsewhere (the loss's defaults,
  ``BlockSizes.get_default``, as the backward always uses)."""
  if platform != "cpu":
    return None
  bits = 16 if np.dtype(dtype).itemsize == 2 else 32
  return BlockSizes(*CPU_FORWARD_TILES[bits])


class StatsImplementation(NamedTuple):
  """The forward and backward of one ``impl`` of :func:`cce_jax.token_stats`."""

  forward: Callable[[TiledInputs, LossOptions], LocalStats]
  backward: Callable[..., LocalGrads]


IMPLEMENTATIONS = {
  "xla": StatsImplementation(xla_forward, xla_backward),
  "reference": StatsImplementation(reference_forward, reference_backward),
}
