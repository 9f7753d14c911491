"""Cut Cross-Entropy in pure JAX: tiled loops that XLA compiles for any backend.

Forward: for each block of tokens, an online log-sum-exp over vocabulary blocks (f32), the
target logit by an indexed dot, and (when a gradient will be taken) the per-class sum of logits
that orders the vocabulary for the backward. Backward: for each vocabulary block (in that
order) and each token block, the logits are recomputed, the softmax gradient is formed, and the
two matrix products that feed dE and dC run under a ``lax.cond`` that skips them when the tile
is negligible (``../shared/MATH.md``). Nothing of size N x V is ever allocated: the temporaries
are a few f32 tiles of ``token_block x vocab_block``, an f32 (N, D) accumulator for dE, and an
f32 (vocab_block, D) accumulator for one block of dC.

Sizes that are not a multiple of a block are handled without padding: the last block starts
early (``min(i * block, size - block)``) and the entries that an earlier block already covered
are masked out.

Under ``jax.vmap`` the forward folds the mapped axis into the token axis (one pass over all
tokens); the backward runs example by example in a ``lax.map``, so each tile's ``lax.cond``
stays a real branch and keeps skipping work (a vmapped ``cond`` would become a ``select`` that
computes both sides).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap, sequential_vmap

from cce_jax import loss_math
from cce_jax.options import LossOptions


class _Tiling(NamedTuple):
  """One axis cut into ``count`` blocks of ``block`` (the last one overlapping if ragged)."""

  size: int
  block: int
  count: int


def _tiling(size: int, block: int) -> _Tiling:
  block = max(1, min(block, size))
  return _Tiling(size, block, -(-size // block))


def _block_start(i: jax.Array, tiling: _Tiling) -> jax.Array:
  return jnp.minimum(i * tiling.block, tiling.size - tiling.block)


def _fresh(i: jax.Array, start: jax.Array, tiling: _Tiling) -> jax.Array | None:
  """(block,) bool: the entries of block ``i`` that no earlier block covered.

  None when the axis is a whole number of blocks: then every entry is fresh, and the callers
  skip the masking altogether.
  """
  if tiling.size % tiling.block == 0:
    return None
  return start + jnp.arange(tiling.block) >= i * tiling.block


def _outer_and(rows: jax.Array | None, cols: jax.Array | None) -> jax.Array | None:
  """The (n, v) mask of two optional 1-D masks; None when both are None (all True)."""
  if rows is None and cols is None:
    return None
  if rows is None:
    return jnp.broadcast_to(cols[None, :], (1, cols.shape[0]))
  if cols is None:
    return rows[:, None]
  return rows[:, None] & cols[None, :]


def _slice(x: jax.Array, start: jax.Array, size: int, axis: int = 0) -> jax.Array:
  return lax.dynamic_slice_in_dim(x, start, size, axis)


def _update(x: jax.Array, block: jax.Array, start: jax.Array, axis: int = 0) -> jax.Array:
  return lax.dynamic_update_slice_in_dim(x, block, start, axis)


def _logits(e_blk: jax.Array, c_blk: jax.Array, vocab_axis: int) -> jax.Array:
  """(n, D) x classifier block -> (n, v) f32 raw logits."""
  dims = (((1,), (1 - vocab_axis,)), ((), ()))
  return lax.dot_general(e_blk, c_blk, dims, preferred_element_type=jnp.float32)


def _grad_e(dx: jax.Array, c_blk: jax.Array, vocab_axis: int) -> jax.Array:
  """(n, v) x classifier block -> (n, D) f32."""
  dims = (((1,), (vocab_axis,)), ((), ()))
  return lax.dot_general(dx, c_blk, dims, preferred_element_type=jnp.float32)


def _grad_c(dx: jax.Array, e_blk: jax.Array, vocab_axis: int) -> jax.Array:
  """(n, v) and (n, D) -> the classifier-block gradient in the layout of c, f32."""
  dims = (((0,), (0,)), ((), ()))
  if vocab_axis == 0:
    return lax.dot_general(dx, e_blk, dims, preferred_element_type=jnp.float32)  # (v, D)
  return lax.dot_general(e_blk, dx, dims, preferred_element_type=jnp.float32)  # (D, v)


def _capped_logits(e_blk, c_blk, bias_blk, opts: LossOptions) -> jax.Array:
  x = _logits(e_blk, c_blk, opts.vocab_axis)
  if bias_blk is not None:
    x = x + bias_blk.astype(jnp.float32)
  return loss_math.apply_softcap(x, opts.softcap)


def _target_logits(e_blk, labels_blk, c, bias, opts: LossOptions) -> jax.Array:
  """The soft-capped logit of each token's label by an indexed dot, (n,) f32."""
  num_classes = c.shape[opts.vocab_axis]
  safe_labels = jnp.clip(labels_blk, 0, num_classes - 1)
  rows = jnp.take(c, safe_labels, axis=opts.vocab_axis)  # (n, D) or (D, n)
  if opts.vocab_axis == 1:
    rows = rows.T
  x = jnp.sum(e_blk.astype(jnp.float32) * rows.astype(jnp.float32), axis=-1)
  if bias is not None:
    x = x + bias[safe_labels].astype(jnp.float32)
  return loss_math.apply_softcap(x, opts.softcap)


def forward(
    e: jax.Array,  # (N, D)
    c: jax.Array,  # (V, D) or (D, V)
    labels: jax.Array,  # (N,) int
    bias: jax.Array | None,  # (V,)
    opts: LossOptions,
    with_order: bool,
) -> tuple[jax.Array, ...]:
  """Per-token loss and lse, both (N,) f32; with ``with_order`` also the backward's class order.

  The order is a (V,) int32 permutation: classes by descending summed logit over the
  non-ignored tokens when ``opts.sort_vocab``, else the identity.
  """
  num_tokens, hidden = e.shape
  num_classes = c.shape[opts.vocab_axis]
  tok = _tiling(num_tokens, opts.block_sizes.token_block)
  voc = _tiling(num_classes, opts.block_sizes.vocab_block)
  want_logit_sum = opts.label_smoothing > 0.0
  want_score = with_order and opts.sort_vocab

  def token_step(i, carry):
    loss_N, lse_N, score_V = carry
    t0 = _block_start(i, tok)
    e_blk = _slice(e, t0, tok.block)  # (n, D)
    labels_blk = _slice(labels, t0, tok.block)  # (n,)
    # Rows that feed the class score: new in this block and not ignored.
    score_rows = labels_blk != opts.ignore_index
    fresh_t = _fresh(i, t0, tok)
    if fresh_t is not None:
      score_rows = score_rows & fresh_t
    score_rows = score_rows.astype(jnp.float32)

    def vocab_step(j, inner):
      running_max, running_sum, logit_sum, score_V = inner
      v0 = _block_start(j, voc)
      c_blk = _slice(c, v0, voc.block, opts.vocab_axis)
      bias_blk = None if bias is None else _slice(bias, v0, voc.block)
      z = _capped_logits(e_blk, c_blk, bias_blk, opts)  # (n, v) f32
      fresh_v = _fresh(j, v0, voc)  # (v,) or None
      z_live = z if fresh_v is None else jnp.where(fresh_v[None, :], z, -jnp.inf)
      new_max = jnp.maximum(running_max, jnp.max(z_live, axis=1))
      running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
          jnp.exp(z_live - new_max[:, None]), axis=1
      )
      if want_logit_sum:
        z_sum = z if fresh_v is None else jnp.where(fresh_v[None, :], z, 0.0)
        logit_sum = logit_sum + jnp.sum(z_sum, axis=1)
      if want_score:
        column_sum = score_rows @ z  # (v,)
        if fresh_v is not None:
          column_sum = jnp.where(fresh_v, column_sum, 0.0)
        score_V = _update(score_V, _slice(score_V, v0, voc.block) + column_sum, v0)
      return new_max, running_sum, logit_sum, score_V

    zeros_n = jnp.zeros((tok.block,), jnp.float32)
    init = (jnp.full((tok.block,), -jnp.inf, jnp.float32), zeros_n, zeros_n, score_V)
    running_max, running_sum, logit_sum, score_V = lax.fori_loop(
        0, voc.count, vocab_step, init
    )
    lse = running_max + jnp.log(running_sum)  # (n,)
    target = _target_logits(e_blk, labels_blk, c, bias, opts)
    loss = loss_math.token_loss(
        lse, target, logit_sum if want_logit_sum else None, num_classes, opts
    )
    loss = loss_math.mask_token_loss(loss, labels_blk, num_classes, opts.ignore_index)
    # Rows shared with the previous block are recomputed identically: overwriting is exact.
    return _update(loss_N, loss, t0), _update(lse_N, lse, t0), score_V

  del hidden
  init = (
      jnp.zeros((num_tokens,), jnp.float32),
      jnp.zeros((num_tokens,), jnp.float32),
      jnp.zeros((num_classes if want_score else 0,), jnp.float32),
  )
  loss_N, lse_N, score_V = lax.fori_loop(0, tok.count, token_step, init)
  if not with_order:
    return loss_N, lse_N
  if want_score:
    order = jnp.argsort(-score_V, stable=True).astype(jnp.int32)
  else:
    order = jnp.arange(num_classes, dtype=jnp.int32)
  return loss_N, lse_N, order


def _product_dtype(dtype) -> jnp.dtype:
  """Operand dtype of the backward's two products: bf16 stays bf16 (f32 accumulation); f16
  goes to f32, because the softmax gradient scaled by 1/N underflows float16's range."""
  return jnp.dtype(dtype) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(jnp.float32)


class BackwardResult(NamedTuple):
  """Gradients of one backward pass, and how many of its tiles were skippable."""

  d_e: jax.Array  # (N, D), dtype of e
  d_c: jax.Array  # layout and dtype of c
  d_bias: jax.Array | None  # (V,), dtype of bias
  skipped_tiles: jax.Array  # () int32
  total_tiles: jax.Array  # () int32


def backward(
    e: jax.Array,  # (N, D)
    c: jax.Array,  # (V, D) or (D, V)
    labels: jax.Array,  # (N,) int
    bias: jax.Array | None,  # (V,)
    lse: jax.Array,  # (N,) f32
    order: jax.Array,  # (V,) int32 class permutation
    g: jax.Array,  # (N,) f32 cotangent of the per-token loss
    h: jax.Array | None,  # (N,) f32 cotangent of lse
    opts: LossOptions,
    with_products: bool = True,
) -> BackwardResult:
  """Gradients w.r.t. e, c and bias (MATH.md), skipping negligible tiles' products.

  With ``with_products=False`` only the skip predicate is evaluated (for ``filter_stats``):
  the gradients come back as zeros and the tile counts are those the real backward sees.
  """
  num_tokens, hidden = e.shape
  num_classes = c.shape[opts.vocab_axis]
  axis = opts.vocab_axis
  tok = _tiling(num_tokens, opts.block_sizes.token_block)
  voc = _tiling(num_classes, opts.block_sizes.vocab_block)
  a = opts.label_smoothing
  uniform_in_tile = a > 0.0 and opts.softcap is not None
  uniform_outside = a > 0.0 and opts.softcap is None
  may_skip = opts.filters_anything
  product_dtype = _product_dtype(e.dtype)
  coeffs = loss_math.token_coefficients(lse, labels, g, h, num_classes, opts)
  block_shape_c = (voc.block, hidden) if axis == 0 else (hidden, voc.block)
  if uniform_outside:
    # The uniform smoothing term is added exactly outside the tiles (MATH.md).
    weighted_e_sum = coeffs.g @ e.astype(jnp.float32)  # (D,)
    g_sum = jnp.sum(coeffs.g)

  def vocab_step(j, carry):
    d_e_acc, d_c, d_bias, skipped = carry
    p0 = _block_start(j, voc)
    class_ids = _slice(order, p0, voc.block)  # (v,) int32
    fresh_v = _fresh(j, p0, voc)
    c_blk = jnp.take(c, class_ids, axis=axis)  # a (v, D) block, never a permuted copy of c
    c_blk_product = c_blk.astype(product_dtype)
    bias_blk = None if bias is None else bias[class_ids]

    def token_step(i, inner):
      d_e_acc, d_c_blk, d_bias_blk, skipped = inner
      t0 = _block_start(i, tok)
      e_blk = _slice(e, t0, tok.block)  # (n, D)
      labels_blk = _slice(labels, t0, tok.block)
      lse_blk = _slice(lse, t0, tok.block)
      co = jax.tree.map(lambda x: _slice(x, t0, tok.block), coeffs)
      valid = _outer_and(_fresh(i, t0, tok), fresh_v)  # (n, v) or None
      z = _capped_logits(e_blk, c_blk, bias_blk, opts)  # (n, v) f32
      is_target = labels_blk[:, None] == class_ids[None, :]
      dz, dx = loss_math.softmax_grad_tile(
          z, lse_blk, is_target, co, valid, opts, uniform_in_tile
      )
      if d_bias_blk is not None:
        d_bias_blk = d_bias_blk + jnp.sum(dx, axis=0)  # cheap, so never skipped
      skip = None
      if may_skip:
        skip = loss_math.tile_is_negligible(dz, co.scale, opts.filter_eps)
        skipped = skipped + skip.astype(jnp.int32)
      if with_products:
        dx_product = dx.astype(product_dtype)

        def add_products(state, filtered: bool):
          # Adds the products whose filtering flag equals ``filtered``.
          rows, c_acc = state
          if opts.filter_e_grad == filtered:
            rows = rows + _grad_e(dx_product, c_blk_product, axis)
          if opts.filter_c_grad == filtered:
            c_acc = c_acc + _grad_c(dx_product, e_blk.astype(product_dtype), axis)
          return rows, c_acc

        state = (_slice(d_e_acc, t0, tok.block), d_c_blk)
        if skip is None:
          state = add_products(add_products(state, True), False)
        else:
          state = add_products(state, False)
          # One real branch for the filtered products: skipped tiles do no matmul.
          state = lax.cond(skip, lambda st: st, lambda st: add_products(st, True), state)
        d_e_acc = _update(d_e_acc, state[0], t0)
        d_c_blk = state[1]
      return d_e_acc, d_c_blk, d_bias_blk, skipped

    init = (
        d_e_acc,
        jnp.zeros(block_shape_c, jnp.float32),
        None if bias is None else jnp.zeros((voc.block,), jnp.float32),
        skipped,
    )
    d_e_acc, d_c_blk, d_bias_blk, skipped = lax.fori_loop(0, tok.count, token_step, init)
    if uniform_outside:
      d_c_blk = d_c_blk - (a / num_classes) * jnp.expand_dims(weighted_e_sum, axis)
      if d_bias_blk is not None:
        d_bias_blk = d_bias_blk - (a / num_classes) * g_sum
    # Classes an earlier block already wrote get an out-of-range index and are dropped.
    write_ids = class_ids if fresh_v is None else jnp.where(fresh_v, class_ids, num_classes)
    d_c_blk = d_c_blk.astype(d_c.dtype)
    if axis == 0:
      d_c = d_c.at[write_ids].set(d_c_blk, mode="drop")
    else:
      d_c = d_c.at[:, write_ids].set(d_c_blk, mode="drop")
    if d_bias is not None:
      d_bias = d_bias.at[write_ids].set(d_bias_blk, mode="drop")
    return d_e_acc, d_c, d_bias, skipped

  init = (
      jnp.zeros((num_tokens, hidden), jnp.float32),
      jnp.zeros_like(c),
      None if bias is None else jnp.zeros((num_classes,), jnp.float32),
      jnp.zeros((), jnp.int32),
  )
  d_e, d_c, d_bias, skipped = lax.fori_loop(0, voc.count, vocab_step, init)
  if uniform_outside:
    class_sum = jnp.sum(c.astype(jnp.float32), axis=axis)  # (D,)
    d_e = d_e - coeffs.gamma[:, None] * class_sum[None, :]
  return BackwardResult(
      d_e=d_e.astype(e.dtype),
      d_c=d_c,
      d_bias=None if bias is None else d_bias.astype(bias.dtype),
      skipped_tiles=skipped,
      total_tiles=jnp.asarray(tok.count * voc.count, jnp.int32),
  )


# ---- vmap: fold the mapped axis into the tokens (forward), map examples (backward) ----------


@functools.cache
def _batched_forward(opts: LossOptions, with_order: bool):
  """``forward`` as a ``custom_vmap``: a vmapped call becomes one call over all tokens."""

  @custom_vmap
  def folded_forward(e, c, labels, bias):
    return forward(e, c, labels, bias, opts, with_order)

  @folded_forward.def_vmap
  def rule(axis_size, in_batched, e, c, labels, bias):
    e_batched, c_batched, labels_batched, bias_batched = in_batched
    if c_batched or bias_batched:
      # A classifier per example: nothing to fold, so run the examples one after another.
      in_axes = [0 if b else None for b in (e_batched, c_batched, labels_batched)]
      in_axes.append(0 if bias_batched else None)
      one_by_one = sequential_vmap(functools.partial(forward, opts=opts, with_order=with_order))
      out = jax.vmap(one_by_one, in_axes=tuple(in_axes))(e, c, labels, bias)
      return out, jax.tree.map(lambda _: True, out)
    if not e_batched:
      e = jnp.broadcast_to(e, (axis_size, *e.shape))
    if not labels_batched:
      labels = jnp.broadcast_to(labels, (axis_size, *labels.shape))
    num_tokens, hidden = e.shape[1:]
    out = folded_forward(e.reshape(-1, hidden), c, labels.reshape(-1), bias)
    loss, lse = (x.reshape(axis_size, num_tokens) for x in out[:2])
    if with_order:
      # One class order serves every example: it only steers which tiles cluster.
      return (loss, lse, out[2]), (True, True, False)
    return (loss, lse), (True, True)

  return folded_forward


@functools.cache
def _batched_backward(opts: LossOptions):
  """``backward`` mapped example by example under vmap, keeping its conds real branches."""
  return sequential_vmap(functools.partial(backward, opts=opts))


# ---- custom_vjp: the differentiable per-token loss ------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _token_loss(e, c, labels, bias, opts: LossOptions, return_lse: bool):
  loss, lse = _batched_forward(opts, False)(e, c, labels, bias)
  return (loss, lse) if return_lse else loss


def _token_loss_fwd(e, c, labels, bias, opts: LossOptions, return_lse: bool):
  loss, lse, order = _batched_forward(opts, True)(e, c, labels, bias)
  out = (loss, lse) if return_lse else loss
  return out, (e, c, labels, bias, lse, order)


def _token_loss_bwd(opts: LossOptions, return_lse: bool, residuals, cotangent):
  e, c, labels, bias, lse, order = residuals
  g, h = cotangent if return_lse else (cotangent, None)
  grads = _batched_backward(opts)(e, c, labels, bias, lse, order, g, h)
  return grads.d_e, grads.d_c, None, grads.d_bias


_token_loss.defvjp(_token_loss_fwd, _token_loss_bwd)


def xla_token_loss(
    e: jax.Array,  # (N, D)
    c: jax.Array,  # (V, D) or (D, V)
    labels: jax.Array,  # (N,) int
    bias: jax.Array | None,  # (V,)
    opts: LossOptions,
    return_lse: bool,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Per-token loss, (N,) f32, and with ``return_lse`` the lse, differentiable w.r.t. e, c, bias.

  Without ``return_lse`` the backward leaves out the lse-gradient terms altogether.
  """
  return _token_loss(e, c, labels, bias, opts, return_lse)


def filter_tile_counts(
    e: jax.Array, c: jax.Array, labels: jax.Array, bias: jax.Array | None, opts: LossOptions
) -> tuple[jax.Array, jax.Array]:
  """(skippable tiles, total tiles) of the backward of the mean loss, as () int32 arrays."""
  _, lse, order = forward(e, c, labels, bias, opts, with_order=True)
  g = jnp.ones_like(lse)  # only g != 0 matters to the predicate
  grads = backward(e, c, labels, bias, lse, order, g, None, opts, with_products=False)
  return grads.skipped_tiles, grads.total_tiles
