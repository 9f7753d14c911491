"""The per-entry math of ../shared/MATH.md, written once for every implementation.

Names follow MATH.md: ``x`` raw logits, ``z`` soft-capped logits, ``lse`` the per-token
log-sum-exp ``L``, ``g`` the cotangent of the per-token loss, ``h`` the cotangent of ``lse``,
``a`` label smoothing, ``k`` z-loss weight, ``s`` softcap. Everything here is f32 elementwise
code on a tile of shape (tokens, classes) or on per-token vectors of shape (tokens,).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cce_jax.options import LossOptions


def default_filter_eps(dtype) -> float:
  """``finfo(dtype).eps / 32``: 2**-12 for bfloat16, 2**-15 for float16, 2**-28 for float32."""
  return float(jnp.finfo(dtype).eps) / 32.0


def apply_softcap(x: jax.Array, softcap: float | None) -> jax.Array:
  """``z = s * tanh(x / s)``, or ``x`` itself without softcap."""
  if softcap is None:
    return x
  return softcap * jnp.tanh(x / softcap)


def softcap_derivative(z: jax.Array, softcap: float | None) -> jax.Array | float:
  """``dz/dx = 1 - (z / s)**2`` written in terms of the capped logit ``z``."""
  if softcap is None:
    return 1.0
  return 1.0 - jnp.square(z / softcap)


def token_loss(
    lse: jax.Array,  # (N,) f32
    target_logit: jax.Array,  # (N,) f32, soft-capped
    logit_sum: jax.Array | None,  # (N,) f32, sum_v z_nv; None when a == 0
    num_classes: int,
    opts: LossOptions,
) -> jax.Array:
  """``loss_n = L_n - (1 - a) z_t - a mean_v z_nv + k L_n**2`` (before masking), (N,) f32."""
  a, k = opts.label_smoothing, opts.z_loss
  loss = lse - (1.0 - a) * target_logit
  if a > 0.0:
    loss = loss - a * logit_sum / num_classes
  if k > 0.0:
    loss = loss + k * jnp.square(lse)
  return loss


def mask_token_loss(
    loss: jax.Array,  # (N,) f32
    labels: jax.Array,  # (N,) int
    num_classes: int,
    ignore_index: int,
) -> jax.Array:
  """Zero at ignored tokens, NaN at labels outside [0, V) that are not ``ignore_index``."""
  ignored = labels == ignore_index
  out_of_range = ~ignored & ((labels < 0) | (labels >= num_classes))
  loss = jnp.where(ignored, 0.0, loss)
  return jnp.where(out_of_range, jnp.nan, loss)


class TokenCoefficients(NamedTuple):
  """Per-token factors of ``dz_nv = alpha_n p_nv - beta_n [v == t_n] - gamma_n``, each (N,) f32.

  ``alpha_n = g_n (1 + 2 k L_n) + h_n``, ``beta_n = g_n (1 - a)``, ``gamma_n = g_n a / V``, with
  ``g_n = 0`` at ignored tokens and ``kappa_n = 1 + 2 k L_n = NaN`` at out-of-range labels, so
  that a bad label poisons the gradient as it poisons the loss. ``kappa`` and ``g`` are kept for
  the filter predicate, which MATH.md states without the cotangent; ``h`` is None when the
  caller has no lse cotangent.
  """

  g: jax.Array
  kappa: jax.Array
  alpha: jax.Array
  beta: jax.Array
  gamma: jax.Array
  h: jax.Array | None


def token_coefficients(
    lse: jax.Array,  # (N,) f32
    labels: jax.Array,  # (N,) int
    g: jax.Array,  # (N,) f32, cotangent of the per-token loss
    h: jax.Array | None,  # (N,) f32, cotangent of lse; None when it is zero
    num_classes: int,
    opts: LossOptions,
) -> TokenCoefficients:
  """Builds the :class:`TokenCoefficients` of a backward pass."""
  a, k = opts.label_smoothing, opts.z_loss
  ignored = labels == opts.ignore_index
  out_of_range = ~ignored & ((labels < 0) | (labels >= num_classes))
  g = jnp.where(ignored, 0.0, g)
  kappa = jnp.where(out_of_range, jnp.nan, 1.0 + 2.0 * k * lse)
  alpha = g * kappa if h is None else g * kappa + h
  return TokenCoefficients(
      g=g, kappa=kappa, alpha=alpha, beta=g * (1.0 - a), gamma=g * (a / num_classes), h=h
  )


def softmax_grad_tile(
    z: jax.Array,  # (n, v) f32 soft-capped logits
    lse: jax.Array,  # (n,) f32
    is_target: jax.Array,  # (n, v) bool
    alpha: jax.Array,  # (n,)
    beta: jax.Array,  # (n,)
    gamma: jax.Array,  # (n,)
    opts: LossOptions,
    uniform_in_tile: bool,
) -> tuple[jax.Array, jax.Array]:
  """The gradient of the loss w.r.t. the raw logits ``x`` of one tile, and the softmax ``p``.

  Returns ``(dx, p)``, both (n, v) f32. The uniform label-smoothing term ``-gamma_n`` is included
  only when ``uniform_in_tile`` (i.e. with softcap); otherwise the caller adds it exactly
  outside the tiles, so that filtering can never drop it.
  """
  p = jnp.exp(z - lse[:, None])
  dz = alpha[:, None] * p - jnp.where(is_target, beta[:, None], 0.0)
  if uniform_in_tile:
    dz = dz - gamma[:, None]
  return dz * softcap_derivative(z, opts.softcap), p


def filter_residual(
    p: jax.Array,  # (n, v) f32 softmax
    is_target: jax.Array,  # (n, v) bool
    kappa: jax.Array,  # (n,)
    g: jax.Array,  # (n,)
    h: jax.Array | None,  # (n,)
    valid: jax.Array,  # (n, v) bool, entries that belong to this tile
    opts: LossOptions,
) -> jax.Array:
  """The largest entry that filtering would drop: a tile is skippable iff this is < filter_eps.

  MATH.md's predicate ``|(1 + 2 k L_n) p_nv - (1 - a)[v == t_n]|`` on rows with a loss
  cotangent, and ``p_nv`` on rows with an lse cotangent. Rows with neither contribute exactly
  zero and never keep a tile alive; NaN (a bad label) always does.
  """
  one_minus_a = 1.0 - opts.label_smoothing
  residual = jnp.abs(kappa[:, None] * p - jnp.where(is_target, one_minus_a, 0.0))
  active = (g != 0.0) | jnp.isnan(kappa)  # (n,)
  residual = jnp.where(valid & active[:, None], residual, 0.0)
  if h is not None:
    residual = jnp.maximum(residual, jnp.where(valid & (h != 0.0)[:, None], p, 0.0))
  # jnp.max propagates NaN, and NaN < eps is False: a poisoned tile is never skipped.
  return jnp.max(residual)
