"""The gradient computed in the forward: three matrix passes instead of four
(``linear_cross_entropy(..., grad_in_forward=True)``, ``impl="xla"``).

When the loss the caller differentiates is the scalar ``S = sum_n w_n loss_n`` (reductions
"mean" and "sum"; "mean" divides ``S`` by the count outside), every per-token cotangent is the
same scalar ``s`` times a factor known in the forward (``w_n``, 0 at ignored tokens), so the
gradient is ``s`` times a fixed triple ``(dE, dC, db)``. The forward computes that triple while
the logits are at hand and the backward only scales it by ``s``:

* per block of ``n`` tokens, sweep 1 computes the block's logits over the whole vocabulary,
  tile by tile (the vocabulary sort's order), keeps them in an f32 ``(n, V)`` buffer and runs
  the online log-sum-exp: **pass 1** (the logits);
* the block's lse, loss and softmax-gradient factors (``loss_math.TokenCoefficients`` for the
  unit cotangent) and its row of the skip table (``cce_jax.filtering.skip_table``, the same
  rule, tiles and order as the four-pass backward) follow;
* sweep 2 reads the logits back from the buffer (no matrix product), forms each tile's
  softmax gradient and accumulates ``dE_blk += G @ C_blk`` (**pass 2**) and
  ``dC[classes] += G.T @ E_blk`` (**pass 3**), skipping a negligible tile's products exactly as
  the four-pass backward does. With both products filtered it loops over the list of the
  block's tiles that are not skipped, so a skipped tile costs nothing (no branch, no zero
  update).

Each tile's dC and db updates are scatter-added into the accumulators; the tile products go
through ``cce_jax.tile_dot`` like the four-pass path's.

The four-pass path (``cce_jax.xla_chunked``) instead recomputes every logit in its backward.

Memory: the ``(n, V)`` f32 buffer (:data:`ROW_BUFFER_BYTES` bounds it for the default tiles),
the f32 accumulators of dE (N, D), dC (shape of ``c``) and db (V,), held from the forward to
the backward, and the per-token loss (N,) with ``weights``.

Where it does not apply, :func:`check_applies` raises naming the argument; under ``jax.vmap``
the forward raises (:data:`VMAP_ERROR`); a second-order derivative raises
``NotImplementedError`` (``cce_jax.differentiable.FIRST_ORDER_ONLY``). When the loss is not
differentiated only the ordinary forward runs. Under ``jax.checkpoint`` (``nnx.remat``) the
forward, gradient included, runs twice (see :func:`summed_loss`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

from cce_jax import differentiable, filtering, loss_math, tile_dot, vma, vocab_sort, xla_chunked
from cce_jax.block_sizes import BlockSizes
from cce_jax.filtering import AxisTiling
from cce_jax.options import LossOptions
from cce_jax.tiled import TiledInputs

# The default tiles keep the (token_block, V) f32 logits buffer of one token block below this.
ROW_BUFFER_BYTES = 64 * 2**20
# The smallest default token block (a multiple of 8 rows), whatever V.
MIN_TOKEN_BLOCK = 8

VMAP_ERROR = (
  "`grad_in_forward=True` does not run under jax.vmap: its forward computes the gradient "
  "for one scalar loss, and a vmapped loss has one per example (with a shared `c`, B "
  "classifier-sized gradients). Pass the batch as leading dimensions of `e` and `labels` "
  "instead of vmapping (one pass over all tokens), or set grad_in_forward=False."
)


def check_applies(
  *, reduction: str, return_lse: bool, impl: str, vocab_axis, requested_impl: str
) -> None:
  """Raises ValueError, naming the conflicting argument, where ``grad_in_forward=True``
  cannot apply: a per-token output (``reduction="none"``), ``return_lse``, a vocabulary
  split (``vocab_axis``), or an implementation other than "xla"."""
  if reduction == "none":
    raise ValueError(
      "`grad_in_forward=True` needs a scalar loss: `reduction` must be 'mean' or 'sum', got "
      "'none' (per-token losses get per-token cotangents, which the forward cannot know)."
    )
  if return_lse:
    raise ValueError(
      "`grad_in_forward=True` cannot be combined with `return_lse=True`: the lse's "
      "cotangent is not known in the forward. Set return_lse=False or grad_in_forward=False."
    )
  if vocab_axis:
    raise ValueError(
      f"`grad_in_forward=True` cannot be combined with `vocab_axis`={vocab_axis!r}: the "
      "softmax needs the lse over every vocabulary shard. Set grad_in_forward=False."
    )
  if impl != "xla":
    raise ValueError(
      f"`grad_in_forward=True` is implemented for impl='xla' only, got `impl`="
      f"{requested_impl!r}; use impl='xla' (or 'auto') or grad_in_forward=False."
    )


def default_block_sizes(block_sizes: BlockSizes, num_classes: int) -> BlockSizes:
  """``block_sizes`` (the four-pass default) with the token block lowered, to a multiple of 8
  rows and at least :data:`MIN_TOKEN_BLOCK`, so that a (token_block, V) f32 buffer fits in
  :data:`ROW_BUFFER_BYTES` (64 rows at V = 256000)."""
  rows = ROW_BUFFER_BYTES // (4 * num_classes)
  rows = max(MIN_TOKEN_BLOCK, rows // 8 * 8)
  return dataclasses.replace(block_sizes, token_block=min(block_sizes.token_block, rows))


# ---- the fused forward -------------------------------------------------------------------------


def _block_coefficients(
  lse: jax.Array,  # (n,) f32
  target: jax.Array,  # (n,) f32
  logit_sum: jax.Array | None,  # (n,) f32
  labels: jax.Array,  # (n,) int32, global ids
  weights: jax.Array | None,  # (n,) f32
  num_classes: int,
  opts: LossOptions,
) -> tuple[jax.Array, loss_math.TokenCoefficients, jax.Array | None]:
  """(unweighted per-token loss (n,), softmax-gradient factors and filter scale (n,)) for the
  unit cotangent of ``S``: the cotangents of lse, target and logit sum come from the same loss
  code as the four-pass path (``differentiable.masked_token_loss``), by ``jax.vjp``."""

  def per_token(lse, target, logit_sum):
    return differentiable.masked_token_loss(lse, target, logit_sum, labels, num_classes, opts)

  loss, vjp = jax.vjp(per_token, lse, target, logit_sum)
  unit = jnp.ones_like(loss) if weights is None else weights
  d_lse, d_target, d_logit_sum = vjp(unit)
  filter_weights = None if weights is None else jnp.abs(weights)
  coeffs, scale = differentiable.backward_coefficients(
    d_lse, d_target, d_logit_sum, opts, filter_weights
  )
  return loss, coeffs, scale


def _slice(x: jax.Array, start: jax.Array, size: int, axis: int = 0) -> jax.Array:
  return lax.dynamic_slice_in_dim(x, start, size, axis)


def _update(x: jax.Array, block: jax.Array, start: jax.Array, axis: int = 0) -> jax.Array:
  return lax.dynamic_update_slice_in_dim(x, block, start, axis)


def _unless(skip: jax.Array | None, work, state):
  """``work(state)``, or ``state`` untouched when ``skip``: a real branch, the work not done."""
  if skip is None:
    return work(state)
  return lax.cond(skip, lambda st: st, work, state)


def fused_forward(
  e: jax.Array,  # (N, D)
  c: jax.Array,  # (V, D) or (D, V)
  labels: jax.Array,  # (N,) int32 global class ids (ignore_index where ignored)
  bias: jax.Array | None,  # (V,)
  weights: jax.Array | None,  # (N,) f32, 0 where not counted
  opts: LossOptions,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """The loss and, for a unit cotangent of ``S``, its gradient, in three matrix passes.

  Returns:
    ``(token_loss, d_e, d_c, d_bias)``: the unweighted per-token loss (N,) f32 (0 at ignored
    tokens, NaN at bad labels), dE (N, D) f32, dC (shape of ``c``) f32 and db (V,) f32 (None
    without bias). ``S = sum(weights * token_loss)`` (or ``sum(token_loss)``).
  """
  num_tokens, hidden = e.shape
  axis = opts.vocab_dim
  num_classes = c.shape[axis]
  tok, voc = xla_chunked.tilings(num_tokens, num_classes, opts)
  held = differentiable.local_labels(labels, 0, num_classes, num_classes, opts)
  order = vocab_sort.vocab_order(e, c, bias, opts) if opts.sort_vocab else None
  filters = opts.filters_anything
  skip_whole_tile = opts.filter_e_grad and opts.filter_c_grad
  want_logit_sum = opts.label_smoothing > 0.0
  uniform_in_tile = filtering.uniform_in_tile(opts)
  product_dtype = filtering.product_dtype(e.dtype)
  upcast = tile_dot.upcasts_16bit(e, c)
  one_block = AxisTiling(tok.block, tok.block, "overlap")  # the skip-table rows of one block

  def classes_of(j):
    """(start in the visiting order, (v,) class ids)."""
    v0 = voc.start(j)
    if order is None:
      return v0, v0 + lax.iota(jnp.int32, voc.block)
    return v0, _slice(order, v0, voc.block)

  def classifier_block(v0, class_ids) -> jax.Array:
    """The tile's classifier block, (v, D) or (D, v), dtype of ``c``."""
    if order is None:
      return _slice(c, v0, voc.block, axis)
    return jnp.take(c, class_ids, axis=axis)  # a gathered block, never a permuted copy of c

  def bias_block(v0, class_ids) -> jax.Array | None:
    """The tile's bias block (v,), or None without bias."""
    if bias is None:
      return None
    return _slice(bias, v0, voc.block) if order is None else bias[class_ids]

  def add_rows(acc: jax.Array, rows: jax.Array, v0, class_ids, vocab_axis: int) -> jax.Array:
    """``acc`` plus ``rows`` at the block's classes (in place in the loop)."""
    if order is None:
      return _update(acc, _slice(acc, v0, voc.block, vocab_axis) + rows, v0, vocab_axis)
    if vocab_axis == 0:
      return acc.at[class_ids].add(rows, mode="drop", unique_indices=True)
    return acc.at[:, class_ids].add(rows, mode="drop", unique_indices=True)

  def token_step(i, carry):
    loss_N, gamma_N, d_e, d_c, d_bias = carry
    t0 = tok.start(i)
    e_blk = _slice(e, t0, tok.block)  # (n, D)
    held_blk = _slice(held, t0, tok.block)
    target = loss_math.target_logits(e_blk, c, held_blk, bias, opts)  # (n,)

    # Sweep 1 (pass 1): the block's logits over the vocabulary, tile by tile in the visiting
    # order, kept in the (n, V) f32 buffer in that order; the online lse and the tile maxima.
    def vocab_forward(j, inner):
      running_max, running_sum, logit_sum, block_max, logits = inner
      v0, class_ids = classes_of(j)
      z = loss_math.capped_logits(
        e_blk, classifier_block(v0, class_ids), bias_block(v0, class_ids), opts, upcast
      )  # (n, v) f32
      fresh_v = voc.live(j, v0)
      new_max, running_sum, tile_max = filtering.online_lse_step(
        running_max, running_sum, z, None if fresh_v is None else fresh_v[None, :]
      )
      if want_logit_sum:
        logit_sum = logit_sum + jnp.sum(z if fresh_v is None else jnp.where(fresh_v, z, 0.0), 1)
      if filters:
        block_max = _update(block_max, tile_max[None, :], j)
      return new_max, running_sum, logit_sum, block_max, _update(logits, z, v0, axis=1)

    zeros_n = jnp.zeros((tok.block,), jnp.float32)
    init = (
      jnp.full((tok.block,), -jnp.inf, jnp.float32),
      zeros_n,
      zeros_n,
      jnp.zeros((voc.count if filters else 0, tok.block), jnp.float32),
      jnp.zeros((tok.block, num_classes), jnp.float32),  # the (n, V) logits buffer
    )
    init = vma.vary_like(init, e, c, bias)
    running_max, running_sum, logit_sum, block_max, logits = lax.fori_loop(
      0, voc.count, vocab_forward, init
    )
    lse = running_max + jnp.log(running_sum)
    labels_blk = _slice(labels, t0, tok.block)
    weights_blk = None if weights is None else _slice(weights, t0, tok.block)
    loss, coeffs, scale = _block_coefficients(
      lse,
      target,
      logit_sum if want_logit_sum else None,
      labels_blk,
      weights_blk,
      num_classes,
      opts,
    )
    lse = filtering.exp_shift(lse)  # as the four-pass backward gets it
    skips = None
    if scale is not None:
      skips = filtering.skip_table(
        block_max, lse, scale, held_blk, order, one_block, voc, opts.filter_eps, 1
      )[0]  # (vocab blocks,)
    rows_live = tok.live(i, t0)
    e_product = e_blk.astype(jnp.float32 if upcast else product_dtype)  # exact

    # Sweep 2 (passes 2 and 3): the softmax gradient of each tile from the kept logits, its
    # products and its dC and db updates. With both products filtered, only the tiles that are
    # not skipped are visited (a loop over their list): a skipped tile costs nothing.
    def tile_work(j, state, product_skip):
      d_e_blk, d_c, d_bias = state
      v0, class_ids = classes_of(j)
      c_blk = classifier_block(v0, class_ids)
      c_product = c_blk.astype(jnp.float32 if upcast else product_dtype)  # exact
      z = _slice(logits, v0, voc.block, axis=1)  # (n, v) f32
      is_target = held_blk[:, None] == class_ids[None, :]
      valid = xla_chunked.outer_and(rows_live, voc.live(j, v0))
      dx = loss_math.softmax_grad_tile(z, lse, is_target, coeffs, valid, opts, uniform_in_tile)
      if d_bias is not None:
        d_bias = add_rows(d_bias, jnp.sum(dx, axis=0), v0, class_ids, 0)  # (v,)
      dx = dx.astype(product_dtype)
      d_e_blk = _unless(
        product_skip if opts.filter_e_grad else None,
        lambda acc: acc + xla_chunked.grad_e_tile(dx, c_product, axis, upcast),
        d_e_blk,
      )
      grad_c = lambda: xla_chunked.grad_c_tile(dx, e_product, axis, upcast)
      if product_skip is not None and opts.filter_c_grad:
        d_c_rows = lax.cond(product_skip, zero_rows, grad_c)
      else:
        d_c_rows = grad_c()  # (v, D) or (D, v) f32
      d_c = add_rows(d_c, d_c_rows, v0, class_ids, axis)
      return d_e_blk, d_c, d_bias

    def zero_rows():
      """A zero dC update, varying (under shard_map) like a tile's."""
      c_shape = (voc.block, hidden) if axis == 0 else (hidden, voc.block)
      return vma.vary_like(jnp.zeros(c_shape, jnp.float32), e, c, bias, labels, weights)

    # Rows an earlier block already finished keep their values (this block adds 0 to them).
    state = (_slice(d_e, t0, tok.block), d_c, d_bias)
    if skips is not None and skip_whole_tile:
      kept = jnp.nonzero(~skips, size=voc.count, fill_value=0)[0]  # (count,) in visiting order
      num_kept = voc.count - jnp.sum(skips, dtype=jnp.int32)

      def kept_step(carry):
        k, state = carry
        return k + 1, tile_work(kept[k], state, None)

      _, state = lax.while_loop(lambda carry: carry[0] < num_kept, kept_step, (0, state))
    else:
      state = lax.fori_loop(
        0, voc.count, lambda j, st: tile_work(j, st, None if skips is None else skips[j]), state
      )
    d_e_blk, d_c, d_bias = state
    return (
      _update(loss_N, loss, t0),
      _update(gamma_N, coeffs.gamma, t0),
      _update(d_e, d_e_blk, t0),
      d_c,
      d_bias,
    )

  init = (
    jnp.zeros((num_tokens,), jnp.float32),
    jnp.zeros((num_tokens,), jnp.float32),
    jnp.zeros((num_tokens, hidden), jnp.float32),
    jnp.zeros(c.shape, jnp.float32),
    None if bias is None else jnp.zeros((num_classes,), jnp.float32),
  )
  init = vma.vary_like(init, e, c, bias, labels, weights)
  token_loss, gamma, d_e, d_c, d_bias = lax.fori_loop(0, tok.count, token_step, init)
  if filtering.uniform_outside(opts):
    # The uniform smoothing term, exactly and outside the tiles, as the four-pass backward.
    uniform = filtering.uniform_terms(e, c, gamma, opts)
    d_e = d_e - gamma[:, None] * uniform.class_sum[None, :]
    d_c = d_c - jnp.expand_dims(uniform.weighted_e, axis)
    if d_bias is not None:
      d_bias = d_bias - uniform.gamma_sum
  return token_loss, d_e, d_c, d_bias


# ---- the custom_vjp ----------------------------------------------------------------------------


@functools.cache
def _unbatched_fused(opts: LossOptions):
  """:func:`fused_forward` for ``opts``, raising ValueError (:data:`VMAP_ERROR`) under vmap."""

  @custom_vmap
  def fused(e, c, labels, bias, weights):
    return fused_forward(e, c, labels, bias, weights, opts)

  @fused.def_vmap
  def rule(axis_size, in_batched, *args):
    del axis_size, in_batched, args
    raise ValueError(VMAP_ERROR)

  return fused


def _weighted_sum(token_loss: jax.Array, weights: jax.Array | None) -> jax.Array:
  return jnp.sum(token_loss if weights is None else token_loss * weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _summed_loss(e, c, labels, bias, weights, opts: LossOptions):
  # Not differentiated: the ordinary forward only, no gradient.
  num_classes = c.shape[opts.vocab_dim]
  held = differentiable.local_labels(labels, 0, num_classes, num_classes, opts)
  inputs = TiledInputs(e, c, held, bias)
  stats = xla_chunked.IMPLEMENTATION.forward(inputs, opts, for_backward=False)
  token_loss = differentiable.masked_token_loss(
    stats.lse, stats.target, stats.logit_sum, labels, num_classes, opts
  )
  return _weighted_sum(token_loss, weights)


def _summed_loss_fwd(e, c, labels, bias, weights, opts: LossOptions):
  # The inputs carry tangents only under a derivative of this gradient: refuse it plainly.
  e, c, bias, weights = differentiable._first_order_only((e, c, bias, weights))
  token_loss, d_e, d_c, d_bias = _unbatched_fused(opts)(e, c, labels, bias, weights)
  residuals = (token_loss if weights is not None else None, d_e, d_c, d_bias, e, c, bias)
  return _weighted_sum(token_loss, weights), residuals


def _summed_loss_bwd(opts: LossOptions, residuals, cotangent):
  del opts
  residuals, cotangent = differentiable._first_order_only((residuals, cotangent))
  token_loss, d_e, d_c, d_bias, e, c, bias = residuals
  scale = lambda grad, like: (cotangent * grad).astype(like.dtype)
  return (
    scale(d_e, e),
    scale(d_c, c),
    None,
    None if bias is None else scale(d_bias, bias),
    None if token_loss is None else cotangent * token_loss,
  )


_summed_loss.defvjp(_summed_loss_fwd, _summed_loss_bwd)


def summed_loss(
  e: jax.Array,  # (N, D)
  c: jax.Array,  # (V, D) or (D, V)
  labels: jax.Array,  # (N,) int32 global class ids
  bias: jax.Array | None,  # (V,)
  weights: jax.Array | None,  # (N,) f32, 0 where not counted
  opts: LossOptions,
) -> jax.Array:
  """``S = sum_n w_n loss_n``, () f32, whose forward (under ``jax.grad``) also computes the
  gradient for a unit cotangent, and whose backward scales it by the cotangent.

  Not differentiated, only the ordinary forward runs. Under ``jax.checkpoint`` the primal
  computation is rerun in the backward, so the forward with its gradient runs twice (six
  matrix passes where the four-pass path under ``jax.checkpoint`` does five): do not wrap
  this loss in ``jax.checkpoint``/``nnx.remat``.

  Raises:
    ValueError: under ``jax.vmap`` (:data:`VMAP_ERROR`).
    NotImplementedError: a derivative of the gradient.
  """
  # Under shard_map the gradients of e, c and bias differ per shard: cast the inputs to vary
  # like every input, so that the transpose of the cast sums them (cce_jax.differentiable).
  e, c, bias = vma.vary_like((e, c, bias), e, c, bias, labels, weights)
  return _summed_loss(e, c, labels, bias, weights, opts)
