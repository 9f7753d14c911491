"""Cut Cross-Entropy in pure JAX: tiled loops that XLA compiles for any backend (``impl="xla"``).

A tiled implementation in the sense of :mod:`cce_jax.tiled`. Forward: for each block of
tokens, an online log-sum-exp over vocabulary blocks (f32) and the target logit by an indexed
dot. When a gradient will be taken, the vocabulary is visited in the backward's order
(descending average logit, computed exactly up front from ``c . mean(e)``), and when filtering
is on the forward records the maximum logit of every token and vocabulary block. Once the lse
and the filter scale are known, ``scale * exp(block max - lse)`` says, before anything is
recomputed, which tiles hold only negligible softmax-gradient entries (``docs/math.md``;
the skip table is ``cce_jax.filtering``'s).

Backward: for each vocabulary block (in that order) and each token block, a tile that is not
skipped recomputes its logits, forms the softmax gradient and accumulates ``dE += G @ C`` and
``dC_block += G.T @ E``; a skipped tile is a ``lax.cond`` branch that does nothing. Nothing of
size N x V is ever allocated: the temporaries are a few f32 tiles of ``token_block x
vocab_block``, an f32 (N, D) accumulator for dE, an f32 (vocab_block, D) accumulator for one
block of dC, and the (vocab blocks, N) block maxima.

Every tile product goes through ``cce_jax.tile_dot.tile_dot``: compiled for CPU, bfloat16 and
float16 tiles are multiplied in f32 (the same products, XLA:CPU's fast matrix product).

Sizes that are not a multiple of a block are handled without padding: both axes use the
"overlap" tiling of :class:`cce_jax.filtering.AxisTiling` (the last block starts early, at
``min(i * block, size - block)``, and the entries that an earlier block already covered are
masked out).

Under ``jax.vmap`` the forward folds the mapped axis into the token axis (one pass over all
tokens); the backward runs example by example in a ``lax.map``, so each tile's ``lax.cond``
stays a real branch and keeps skipping work (a vmapped ``cond`` would become a ``select`` that
computes both sides).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax import column_slabs, filtering, loss_math, tile_dot, vma, vocab_sort
from cce_jax.block_sizes import BlockSizes
from cce_jax.filtering import AxisTiling
from cce_jax.options import LossOptions
from cce_jax.tiled import (
  ForwardFn,
  Implementation,
  LocalForward,
  LocalGrads,
  Residuals,
  SkipTableFn,
  TiledInputs,
  examples_in_sequence,
  fold_examples,
  resolve_block_sizes_of,
)


def tilings(num_tokens: int, num_classes: int, opts: LossOptions) -> tuple[AxisTiling, AxisTiling]:
  """The (tokens, classes) tilings: both overlapped, blocks clamped to the axis."""
  sizes = opts.block_sizes
  return (
    filtering.overlapped(num_tokens, sizes.token_block),
    filtering.overlapped(num_classes, sizes.vocab_block),
  )


# How a tile reads its classes from c and writes them into dC (:func:`classifier_access`).
_ROWS, _SLABS, _WINDOW, _COLUMNS = "rows", "slabs", "window", "columns"


def classifier_access(num_classes: int, vocab_block: int, opts: LossOptions) -> str:
  """How the tiles of a classifier with ``num_classes`` classes in ``vocab_block``-wide tiles
  (clamped) are read from ``c`` and written into dC:

  * ``"rows"``: (V, D), rows gathered and scattered by class id;
  * ``"slabs"``: (D, V) with V and the block multiples of a slab width
    (``column_slabs.tile_slab_width``): the vocabulary sort orders whole slabs of columns,
    read and written in place;
  * ``"window"``: (D, V) without the sort: each tile is a window of consecutive columns;
  * ``"columns"``: (D, V) otherwise: single columns gathered and scattered, for which XLA:TPU
    transposes ``c`` (and dC) once per call (README, "Classifier layout and memory on TPU").
  """
  if opts.vocab_dim == 0:
    return _ROWS
  if column_slabs.tile_slab_width(num_classes, vocab_block) is not None:
    return _SLABS
  return _COLUMNS if opts.sort_vocab else _WINDOW


def _read_block(
  c: jax.Array, class_ids: jax.Array, start: jax.Array, size: int, access: str
) -> jax.Array:
  """The tile of ``c`` holding classes ``class_ids`` ((v,), the order from ``start``), in the
  layout of ``c``: (v, D) or (D, v)."""
  if access == _ROWS:
    return jnp.take(c, class_ids, axis=0)  # a (v, D) block, never a permuted copy of c
  if access == _SLABS:
    width = column_slabs.tile_slab_width(c.shape[1], size)
    return column_slabs.gather_slabs(c, class_ids, width)
  if access == _WINDOW:
    return _slice(c, start, size, axis=1)
  return jnp.take(c, class_ids, axis=1)


def _write_block(
  d_c: jax.Array,
  block: jax.Array,
  class_ids: jax.Array,
  start: jax.Array,
  fresh: jax.Array | None,
  access: str,
) -> jax.Array:
  """``d_c`` with the tile ``block`` (same dtype) written at ``class_ids`` (the order from
  ``start``); the classes that are not ``fresh`` ((v,) bool, an earlier tile wrote them) keep
  their values."""
  num_classes = d_c.shape[0 if access == _ROWS else 1]
  if access == _SLABS:
    width = column_slabs.tile_slab_width(num_classes, block.shape[1])
    return column_slabs.write_slabs(d_c, block, class_ids, fresh, width)
  if access == _WINDOW:
    if fresh is not None:
      block = jnp.where(fresh[None, :], block, _slice(d_c, start, block.shape[1], axis=1))
    return _update(d_c, block, start, axis=1)
  # Classes an earlier block already wrote get an out-of-range index and are dropped.
  write_ids = class_ids if fresh is None else jnp.where(fresh, class_ids, num_classes)
  if access == _ROWS:
    return d_c.at[write_ids].set(block, mode="drop")
  return d_c.at[:, write_ids].set(block, mode="drop")


def grad_c_storage(c: jax.Array, compiled_for_cpu: bool) -> jnp.dtype:
  """The dtype a backward's dC (dtype of ``c``) is held in while its blocks are written (this
  module's and ``local_stats``'): ``uint16`` (the same bits) for a 16-bit float ``c``
  compiled for CPU, else ``c.dtype``.

  XLA:CPU has no 16-bit float scatter, and it moves a 16-bit dynamic-update-slice to f32 too:
  it converted the whole (V, D) dC to f32 and back around every block's write, two passes
  over V x D per vocabulary block (quadratic in V; a quarter of the bfloat16 loss+grad's time
  at V = 32768). Integers of the same width are written in place, and a write moves bits, so
  the values are identical. Other compile targets write 16-bit floats natively."""
  if compiled_for_cpu and jnp.dtype(c.dtype) in tile_dot.SIXTEEN_BIT_FLOATS:
    return jnp.dtype(jnp.uint16)
  return jnp.dtype(c.dtype)


def to_storage(x: jax.Array, storage: jnp.dtype) -> jax.Array:
  """``x`` as ``storage`` (:func:`grad_c_storage`): a bitcast for same-width integers."""
  if x.dtype == storage:
    return x
  return lax.bitcast_convert_type(x, storage)


def outer_and(rows: jax.Array | None, cols: jax.Array | None) -> jax.Array | None:
  """The (n, v) mask of two optional 1-D masks; None when both are None (all True)."""
  if rows is None and cols is None:
    return None
  if rows is None:
    return cols[None, :]
  if cols is None:
    return rows[:, None]
  return rows[:, None] & cols[None, :]


def _slice(x: jax.Array, start: jax.Array, size: int, axis: int = 0) -> jax.Array:
  return lax.dynamic_slice_in_dim(x, start, size, axis)


def _update(x: jax.Array, block: jax.Array, start: jax.Array, axis: int = 0) -> jax.Array:
  return lax.dynamic_update_slice_in_dim(x, block, start, axis)


def grad_e_tile(dx: jax.Array, c_blk: jax.Array, vocab_dim: int, upcast: bool = False) -> jax.Array:
  """(n, v) x classifier block -> (n, D) f32 (``upcast``: see ``tile_dot.tile_dot``)."""
  dims = (((1,), (vocab_dim,)), ((), ()))
  return tile_dot.tile_dot(dx, c_blk, dims, upcast)


def grad_c_tile(dx: jax.Array, e_blk: jax.Array, vocab_dim: int, upcast: bool = False) -> jax.Array:
  """(n, v) and (n, D) -> the classifier-block gradient in the layout of c, f32 (``upcast``:
  see ``tile_dot.tile_dot``)."""
  dims = (((0,), (0,)), ((), ()))
  if vocab_dim == 0:
    return tile_dot.tile_dot(dx, e_blk, dims, upcast)  # (v, D)
  return tile_dot.tile_dot(e_blk, dx, dims, upcast)  # (D, v)


def forward(inputs: TiledInputs, opts: LossOptions, for_backward: bool) -> LocalForward:
  """Per-token lse, target logit and logit sum (``cce_jax.tiled.LocalForward``).

  For a backward the vocabulary is visited in :func:`vocab_sort.vocab_order` (blocks of
  ``c`` gathered by class id, never a permuted copy of ``c``), the blocks the backward will
  visit, and when filtering is on the maximum logit of every (block, token) is recorded:
  with the lse and the filter scale it bounds every entry of a tile's softmax gradient.
  """
  e, c, local_labels, bias = inputs  # (N, D), (V, D) or (D, V), (N,), (V,) or None
  num_tokens = e.shape[0]
  axis = opts.vocab_dim
  tok, voc = tilings(num_tokens, c.shape[axis], opts)
  access = classifier_access(c.shape[axis], voc.block, opts)
  want_logit_sum = opts.label_smoothing > 0.0
  order = None
  if for_backward:
    slab_width = None
    if access == _SLABS:
      slab_width = column_slabs.tile_slab_width(c.shape[axis], voc.block)
    order = vocab_sort.vocab_order(e, c, bias, opts, slab_width=slab_width)
  want_block_max = for_backward and opts.filters_anything
  upcast = tile_dot.upcasts_16bit(e, c)

  def classifier_block(v0):
    if order is None:
      return _slice(c, v0, voc.block, axis), None if bias is None else _slice(bias, v0, voc.block)
    class_ids = _slice(order, v0, voc.block)
    c_blk = _read_block(c, class_ids, v0, voc.block, access)
    return c_blk, None if bias is None else bias[class_ids]

  def token_step(i, carry):
    lse_N, target_N, logit_sum_N, block_max_BN = carry
    t0 = tok.start(i)
    e_blk = _slice(e, t0, tok.block)  # (n, D)
    target = loss_math.target_logits(e_blk, c, _slice(local_labels, t0, tok.block), bias, opts)

    def vocab_step(j, inner):
      running_max, running_sum, logit_sum, block_max = inner
      v0 = voc.start(j)
      c_blk, bias_blk = classifier_block(v0)
      z = loss_math.capped_logits(e_blk, c_blk, bias_blk, opts, upcast)  # (n, v) f32
      fresh_v = voc.live(j, v0)  # (v,) or None
      new_max, running_sum, tile_max = filtering.online_lse_step(
        running_max, running_sum, z, None if fresh_v is None else fresh_v[None, :]
      )
      if want_logit_sum:
        z_sum = z if fresh_v is None else jnp.where(fresh_v[None, :], z, 0.0)
        logit_sum = logit_sum + jnp.sum(z_sum, axis=1)
      if want_block_max:
        block_max = _update(block_max, tile_max[None, :], j)
      return new_max, running_sum, logit_sum, block_max

    zeros_n = jnp.zeros((tok.block,), jnp.float32)
    block_max = jnp.zeros((voc.count if want_block_max else 0, tok.block), jnp.float32)
    init = (jnp.full((tok.block,), -jnp.inf, jnp.float32), zeros_n, zeros_n, block_max)
    init = vma.vary_like(init, e, c, bias)
    running_max, running_sum, logit_sum, block_max = lax.fori_loop(0, voc.count, vocab_step, init)
    # Rows shared with the previous block are recomputed identically: overwriting is exact.
    return (
      _update(lse_N, running_max + jnp.log(running_sum), t0),
      _update(target_N, target, t0),
      _update(logit_sum_N, logit_sum, t0) if want_logit_sum else logit_sum_N,
      _update(block_max_BN, block_max, t0, axis=1) if want_block_max else block_max_BN,
    )

  init = (
    jnp.zeros((num_tokens,), jnp.float32),
    jnp.zeros((num_tokens,), jnp.float32),
    jnp.zeros((num_tokens if want_logit_sum else 0,), jnp.float32),
    jnp.zeros((voc.count, num_tokens) if want_block_max else (0, 0), jnp.float32),
  )
  init = vma.vary_like(init, e, c, bias)
  lse, target, logit_sum, block_max = lax.fori_loop(0, tok.count, token_step, init)
  return LocalForward(
    lse=lse,
    target=target,
    logit_sum=logit_sum if want_logit_sum else None,
    residuals=Residuals(order, block_max if want_block_max else None) if for_backward else None,
  )


def _unless(skip: jax.Array | None, work, state):
  """``work(state)``, or ``state`` untouched when ``skip``: a real branch, the work not done."""
  if skip is None:
    return work(state)
  return lax.cond(skip, lambda st: st, work, state)


def backward(
  inputs: TiledInputs,
  residuals: Residuals,
  lse: jax.Array,  # (N,) f32
  coeffs: loss_math.TokenCoefficients,
  filter_scale: jax.Array | None,  # (N,) f32
  opts: LossOptions,
) -> LocalGrads:
  """Gradients w.r.t. e, c and bias (``cce_jax.tiled.BackwardFn``), skipping the tiles of
  ``cce_jax.filtering.skip_table``.

  A skipped tile costs nothing when both ``filter_e_grad`` and ``filter_c_grad`` are on (not
  even the logits are recomputed; its bias-gradient entries are dropped with it); with one of
  them on, only that product is skipped.
  """
  e, c, local_labels, bias = inputs
  num_tokens, hidden = e.shape
  num_classes = c.shape[opts.vocab_dim]
  axis = opts.vocab_dim
  tok, voc = tilings(num_tokens, num_classes, opts)
  access = classifier_access(num_classes, voc.block, opts)
  uniform_in_tile = filtering.uniform_in_tile(opts)
  uniform_outside = filtering.uniform_outside(opts)
  product_dtype = filtering.product_dtype(e.dtype)
  upcast = tile_dot.upcasts_16bit(e, c)
  skips = None
  if filter_scale is not None:
    skips = filtering.skip_table(
      residuals.block_max,
      lse,
      filter_scale,
      local_labels,
      residuals.order,
      tok,
      voc,
      opts.filter_eps,
      block_max_token_axis=1,
    )
  skip_whole_tile = opts.filter_e_grad and opts.filter_c_grad
  block_shape_c = (voc.block, hidden) if axis == 0 else (hidden, voc.block)
  if uniform_outside:
    # The uniform smoothing term is added exactly outside the tiles (docs/math.md).
    uniform = filtering.uniform_terms(e, c, coeffs.gamma, opts)

  def vocab_step(j, carry):
    d_e_acc, d_c, d_bias = carry
    p0 = voc.start(j)
    class_ids = _slice(residuals.order, p0, voc.block)  # (v,) int32
    fresh_v = voc.live(j, p0)
    c_blk = _read_block(c, class_ids, p0, voc.block, access)  # (v, D) or (D, v)
    if upcast:
      c_blk = c_blk.astype(jnp.float32)  # exact; once per block for the products of its tiles
    c_blk_product = c_blk if upcast else c_blk.astype(product_dtype)
    bias_blk = None if bias is None else bias[class_ids]

    def token_step(i, inner):
      d_e_acc, d_c_blk, d_bias_blk = inner
      t0 = tok.start(i)
      e_blk = _slice(e, t0, tok.block)  # (n, D)
      skip = None if skips is None else skips[i, j]

      def tile_work(state, product_skip):
        # Recomputes the tile; the products whose filter flag is on run unless product_skip.
        rows, c_acc, b_acc = state
        labels_blk = _slice(local_labels, t0, tok.block)
        co = jax.tree.map(lambda x: _slice(x, t0, tok.block), coeffs)
        valid = outer_and(tok.live(i, t0), fresh_v)  # (n, v) or None
        z = loss_math.capped_logits(e_blk, c_blk, bias_blk, opts, upcast)  # (n, v) f32
        is_target = labels_blk[:, None] == class_ids[None, :]
        dx = loss_math.softmax_grad_tile(
          z, _slice(lse, t0, tok.block), is_target, co, valid, opts, uniform_in_tile
        )
        if b_acc is not None:
          b_acc = b_acc + jnp.sum(dx, axis=0)
        dx = dx.astype(product_dtype)
        rows = _unless(
          product_skip if opts.filter_e_grad else None,
          lambda rows: rows + grad_e_tile(dx, c_blk_product, axis, upcast),
          rows,
        )
        c_acc = _unless(
          product_skip if opts.filter_c_grad else None,
          lambda c_acc: c_acc + grad_c_tile(dx, e_blk.astype(product_dtype), axis, upcast),
          c_acc,
        )
        return rows, c_acc, b_acc

      state = (_slice(d_e_acc, t0, tok.block), d_c_blk, d_bias_blk)
      if skip is not None and skip_whole_tile:
        # A skipped tile recomputes nothing and multiplies nothing.
        state = _unless(skip, lambda st: tile_work(st, None), state)
      else:
        state = tile_work(state, skip)
      return _update(d_e_acc, state[0], t0), state[1], state[2]

    init = (
      d_e_acc,
      jnp.zeros(block_shape_c, jnp.float32),
      None if bias is None else jnp.zeros((voc.block,), jnp.float32),
    )
    init = vma.vary_like(init, e, c, bias, coeffs)
    d_e_acc, d_c_blk, d_bias_blk = lax.fori_loop(0, tok.count, token_step, init)
    if uniform_outside:
      d_c_blk = d_c_blk - jnp.expand_dims(uniform.weighted_e, axis)
      if d_bias_blk is not None:
        d_bias_blk = d_bias_blk - uniform.gamma_sum
    d_c_blk = to_storage(d_c_blk.astype(c.dtype), d_c.dtype)
    d_c = _write_block(d_c, d_c_blk, class_ids, p0, fresh_v, access)
    if d_bias is not None:
      write_ids = class_ids if fresh_v is None else jnp.where(fresh_v, class_ids, num_classes)
      d_bias = d_bias.at[write_ids].set(d_bias_blk, mode="drop")
    return d_e_acc, d_c, d_bias

  init = (
    jnp.zeros((num_tokens, hidden), jnp.float32),
    jnp.zeros(c.shape, grad_c_storage(c, upcast)),
    None if bias is None else jnp.zeros((num_classes,), jnp.float32),
  )
  init = vma.vary_like(init, e, c, bias, coeffs)
  d_e, d_c, d_bias = lax.fori_loop(0, voc.count, vocab_step, init)
  d_c = to_storage(d_c, jnp.dtype(c.dtype))  # the bits back as c's float dtype
  if uniform_outside:
    d_e = d_e - coeffs.gamma[:, None] * uniform.class_sum[None, :]
  return LocalGrads(d_e=d_e, d_c=d_c, d_bias=d_bias)


def skip_table_of(forward_fn: ForwardFn) -> SkipTableFn:
  """The :class:`cce_jax.tiled.SkipTableFn` of this module's backward paired with
  ``forward_fn``, a forward whose residuals are :class:`cce_jax.tiled.Residuals` with block
  maxima (vocab blocks, N) over this module's vocabulary tiles (its own, or a kernel's that
  feeds this backward)."""

  def skip_table(
    inputs: TiledInputs,
    filter_scale: Callable[[jax.Array], jax.Array],  # (N,) lse -> (N,) filter scale
    opts: LossOptions,
  ) -> jax.Array:
    """(token blocks, vocab blocks) bool: the tiles the backward of ``inputs`` skips; runs the
    forward."""
    tok, voc = tilings(inputs.e.shape[0], inputs.c.shape[opts.vocab_dim], opts)
    if not opts.filters_anything:
      return jnp.zeros((tok.count, voc.count), bool)
    fwd = forward_fn(inputs, opts, for_backward=True)
    return filtering.skip_table(
      fwd.residuals.block_max,
      fwd.lse,
      filter_scale(fwd.lse),
      inputs.local_labels,
      fwd.residuals.order,
      tok,
      voc,
      opts.filter_eps,
      block_max_token_axis=1,
    )

  return skip_table


skip_table = skip_table_of(forward)


IMPLEMENTATION = Implementation(
  name="xla",
  # Under vmap the forward runs once over every example's tokens; the backward runs the
  # examples one after another, so each tile's lax.cond stays a real branch.
  forward=fold_examples(forward, block_max_token_axis=1),
  backward=examples_in_sequence(backward),
  skip_table=skip_table,
  resolve_block_sizes=resolve_block_sizes_of(BlockSizes, BlockSizes.get_default),
)
