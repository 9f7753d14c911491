"""The differentiable per-token loss, shared by every implementation and both sharded modes.

An implementation computes, over the classes it holds, three per-token statistics: the
log-sum-exp, the target logit (where it holds the target) and, with label smoothing, the sum of
the logits (:class:`cce_jax.tiled.LocalForward`). Everything else is ordinary JAX here:

* with ``opts.vocab_axis`` (inside ``shard_map``, ``c`` split over the vocabulary along that
  mesh axis) the statistics are combined across the axis in f32: lse by max then sum of exp,
  the target logit and the logit sum by a sum;
* the loss formula (``loss_math.token_loss``), the masking of ignored tokens and the NaN of
  out-of-range labels.

The statistics of an implementation ("reference" included) form one ``jax.custom_vjp`` whose
backward turns the cotangents of (lse, target, logit sum) into the per-token factors of the
softmax gradient (``TokenCoefficients``) and the filter scale of ``docs/math.md``'s skip rule,
and calls the implementation's backward. Because the collectives are ordinary differentiable
JAX outside that ``custom_vjp``, JAX transposes them: the gradient of ``e`` is summed over the
vocabulary axis by ``shard_map``'s own rules, correctly with ``check_vma`` on or off.

That backward is not differentiable itself: a derivative of the gradient (``jax.hessian``,
grad of grad) raises ``NotImplementedError`` (:data:`FIRST_ORDER_ONLY`) from a ``custom_jvp``
guard on the ``custom_vjp``'s forward inputs and backward residuals.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax import dispatch, filtering, loss_math, vma
from cce_jax.options import LossOptions
from cce_jax.tiled import LocalForward, TiledInputs


def vocab_shard(num_local: int, vocab_axis) -> tuple[jax.Array | int, int]:
  """(first class id held here, global number of classes) for a vocabulary split over
  ``vocab_axis`` in equal contiguous slices; (0, ``num_local``) when ``vocab_axis`` is None."""
  if vocab_axis is None:
    return 0, num_local
  return lax.axis_index(vocab_axis) * num_local, num_local * lax.axis_size(vocab_axis)


def local_labels(
  labels: jax.Array, offset: jax.Array | int, num_local: int, num_classes: int, opts: LossOptions
) -> jax.Array:
  """(N,) int32: each label minus ``offset`` where this shard holds it and it counts, else -1."""
  kinds = loss_math.label_kinds(labels, num_classes, opts.ignore_index)
  local = labels - offset
  held = ~kinds.ignored & ~kinds.out_of_range & (local >= 0) & (local < num_local)
  return jnp.where(held, local, -1).astype(jnp.int32)


def _combine(stats: LocalForward, vocab_axis) -> LocalForward:
  """The statistics over every shard of ``vocab_axis`` (f32; differentiable)."""
  if vocab_axis is None:
    return stats
  # The max only keeps exp() in range; its gradient cancels, so it is not differentiated.
  peak = lax.pmax(lax.stop_gradient(stats.lse), vocab_axis)
  lse = peak + jnp.log(lax.psum(jnp.exp(stats.lse - peak), vocab_axis))
  logit_sum = None if stats.logit_sum is None else lax.psum(stats.logit_sum, vocab_axis)
  return LocalForward(lse, lax.psum(stats.target, vocab_axis), logit_sum)


def token_loss(
  e: jax.Array,  # (N, D)
  c: jax.Array,  # (V_local, D) or (D, V_local)
  labels: jax.Array,  # (N,) int32, global class ids
  bias: jax.Array | None,  # (V_local,)
  opts: LossOptions,
  return_lse: bool,
  impl: str,
  weights: jax.Array | None = None,  # (N,) f32
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Per-token loss, (N,) f32 (0 at ignored tokens, NaN at out-of-range labels), and with
  ``return_lse`` the lse over all classes, differentiable w.r.t. ``e``, ``c`` and ``bias``.

  With ``weights`` (N,) f32 the loss of token ``n`` is multiplied by ``weights[n]``
  (differentiable w.r.t. the weights too: their gradient is the unweighted loss times the
  cotangent), and the backward's filter scale by ``|weights[n]|`` (``docs/math.md``). The weights
  at ignored tokens must be finite (the caller zeroes them).

  ``impl`` names an implementation registered in :mod:`cce_jax.dispatch` (not "auto").

  Raises:
    ValueError: a Pallas implementation in interpret mode inside ``shard_map`` with
      ``check_vma=True``.
  """
  num_local = c.shape[opts.vocab_dim]
  offset, num_classes = vocab_shard(num_local, opts.vocab_axis)
  held = local_labels(labels, offset, num_local, num_classes, opts)
  # Under shard_map, e is the same on every vocabulary shard and c on every token shard, but
  # their gradients are not: cast them to vary along every axis any input varies along, so
  # that the transpose of the cast sums the per-shard gradients (with check_vma off,
  # shard_map's own transpose does that sum).
  filter_weights = None if weights is None else lax.stop_gradient(jnp.abs(weights))
  e, c, bias, filter_weights = vma.vary_like(
    (e, c, bias, filter_weights), e, c, bias, held, filter_weights
  )
  # opts.interpret is only ever True for a Pallas implementation (checks.build_options).
  if opts.interpret and vma.varying_axes(e, c, bias, held, filter_weights):
    raise ValueError(
      f"`impl`={impl!r} with `interpret=True` inside jax.shard_map needs check_vma=False: "
      "JAX's Pallas interpreter does not track varying manual axes. (Compiled kernels, and "
      "`mesh=`, which uses check_vma=False for Pallas implementations, are not affected.)"
    )
  stats = LocalForward(*_local_stats(e, c, held, bias, filter_weights, opts, impl))
  lse, target, logit_sum = _combine(stats, opts.vocab_axis)[:3]
  loss = masked_token_loss(lse, target, logit_sum, labels, num_classes, opts)
  if weights is not None:
    loss = loss * weights
  return (loss, lse) if return_lse else loss


def masked_token_loss(
  lse: jax.Array,  # (N,) f32, over all classes
  target: jax.Array,  # (N,) f32
  logit_sum: jax.Array | None,  # (N,) f32, or None without label smoothing
  labels: jax.Array,  # (N,) int32, global class ids
  num_classes: int,
  opts: LossOptions,
) -> jax.Array:
  """The unweighted per-token loss from the combined statistics, (N,) f32: 0 at ignored
  tokens, NaN at out-of-range labels (differentiable; a bad label also poisons the lse's
  cotangent, so the NaN reaches the gradients, not only the loss value)."""
  kinds = loss_math.label_kinds(labels, num_classes, opts.ignore_index)
  poisoned_lse = lse * jnp.where(kinds.out_of_range, jnp.nan, 1.0)
  loss = loss_math.token_loss(poisoned_lse, target, logit_sum, num_classes, opts)
  return loss_math.mask_token_loss(loss, labels, num_classes, opts.ignore_index)


# ---- the custom_vjp around an implementation ---------------------------------------------------

FIRST_ORDER_ONLY = (
  "cce_jax.linear_cross_entropy supports first-order reverse-mode differentiation only "
  "(jax.grad, jax.value_and_grad, jax.vjp); it was asked for a derivative of its gradient "
  "(a second-order derivative: jax.hessian, jax.grad of jax.grad, jax.jacfwd or jax.jacrev "
  "of jax.grad, a Hessian-vector product, or a derivative of a jax.vjp function). The "
  "gradient comes from the loss's own tiled backward, which is not differentiable itself."
)


@jax.custom_jvp
def _first_order_only(tree):
  """``tree`` unchanged; differentiating it raises NotImplementedError (FIRST_ORDER_ONLY)."""
  return tree


@_first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
  del primals, tangents
  raise NotImplementedError(FIRST_ORDER_ONLY)


# ``filter_weights`` ((N,) f32 |w_n|, or None) only scales the filter rule; it gets no cotangent
# here (the weights' gradient comes from the product outside, in ``token_loss``).
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _local_stats(e, c, held, bias, filter_weights, opts: LossOptions, impl: str):
  inputs = TiledInputs(e, c, held, bias)
  stats = dispatch.implementation(impl).forward(inputs, opts, for_backward=False)
  return stats.lse, stats.target, stats.logit_sum


def _local_stats_fwd(e, c, held, bias, filter_weights, opts: LossOptions, impl: str):
  # The inputs carry tangents here only when a derivative encloses this reverse-mode one
  # (jax.hessian, grad of grad): refuse it plainly rather than fail deep inside JAX.
  e, c, bias = _first_order_only((e, c, bias))
  inputs = TiledInputs(e, c, held, bias)
  stats = dispatch.implementation(impl).forward(inputs, opts, for_backward=True)
  residuals = (e, c, held, bias, filter_weights, stats.lse, stats.residuals)
  return (stats.lse, stats.target, stats.logit_sum), residuals


def backward_coefficients(
  d_lse: jax.Array,
  d_target: jax.Array,
  d_logit_sum: jax.Array | None,
  opts: LossOptions,
  filter_weights: jax.Array | None = None,
) -> tuple[loss_math.TokenCoefficients, jax.Array | None]:
  """The softmax-gradient factors and the filter scale of ``cce_jax.tiled``'s backward, from
  the cotangents (each (N,) f32) of the local lse, target logit and logit sum, and the
  absolute per-token weights ``filter_weights`` ((N,) f32, or None for weight 1).

  With ``loss_n = L_n - (1 - a) z_t - (a / V) sum_v z + k L_n^2`` (``L`` combined over shards
  from the local ``lse``), the cotangent of the target logit is ``-(1 - a) g_n`` on every
  shard, which recovers the loss cotangent ``g_n``, the scale of the filter rule
  (``docs/math.md``). The lse's cotangent, ``alpha``, is NaN at an out-of-range label (see
  :func:`token_loss`).
  """
  g = -d_target / (1.0 - opts.label_smoothing)
  alpha = d_lse
  gamma = jnp.zeros_like(d_lse) if d_logit_sum is None else -d_logit_sum
  coeffs = loss_math.TokenCoefficients(g=g, alpha=alpha, beta=-d_target, gamma=gamma)
  if not opts.filters_anything:
    return coeffs, None
  # |alpha_n p_nv| < eps |g_n|  <=>  (|alpha_n| / |g_n|) p_nv < eps: 0/0 is 0 (a row without
  # gradient), x/0 is inf (a row with only an lse cotangent is never skipped).
  if filter_weights is None:
    scale = jnp.where(alpha == 0.0, 0.0, jnp.abs(alpha) / jnp.abs(g))
  else:
    # g_n carries w_n, so |alpha_n| / |g_n| does not depend on it; |w_n| makes the rule
    # |alpha_n p_nv| < eps |g_n / w_n|, a tolerance per unit of weight. A zero weight with
    # an lse cotangent gives 0/0 = NaN: never skipped.
    scale = jnp.where(alpha == 0.0, 0.0, jnp.abs(alpha) * filter_weights / jnp.abs(g))
  return coeffs, scale


def _local_stats_bwd(opts: LossOptions, impl: str, residuals, cotangents):
  # Only a derivative of the gradient differentiates the backward (e.g. of a jax.vjp function).
  residuals, cotangents = _first_order_only((residuals, cotangents))
  e, c, held, bias, filter_weights, lse, impl_residuals = residuals
  coeffs, filter_scale = backward_coefficients(*cotangents, opts, filter_weights)
  # A shard whose classes are all masked (-inf logits) has lse -inf: its softmax is 0, which
  # exp(z - 0) gives, where exp(z - lse) would be exp(-inf + inf) = NaN.
  lse = filtering.exp_shift(lse)
  grads = dispatch.implementation(impl).backward(
    TiledInputs(e, c, held, bias), impl_residuals, lse, coeffs, filter_scale, opts
  )
  d_bias = None if bias is None else grads.d_bias.astype(bias.dtype)
  return grads.d_e.astype(e.dtype), grads.d_c.astype(c.dtype), None, d_bias, None


_local_stats.defvjp(_local_stats_fwd, _local_stats_bwd)
