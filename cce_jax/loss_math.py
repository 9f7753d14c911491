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
  ``g_n = 0`` at ignored tokens and ``alpha_n = NaN`` at out-of-range labels, so that a bad label
  poisons the gradient as it poisons the loss. ``g`` is the loss cotangent with ignored tokens
  zeroed; ``scale_n = |g_n| + |h_n|`` sizes the row's filter threshold (see
  :func:`tile_is_negligible`).
  """

  g: jax.Array
  alpha: jax.Array
  beta: jax.Array
  gamma: jax.Array
  scale: jax.Array


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
  alpha = g * jnp.where(out_of_range, jnp.nan, 1.0 + 2.0 * k * lse)
  scale = jnp.abs(g)
  if h is not None:
    alpha = alpha + h
    scale = scale + jnp.abs(h)
  return TokenCoefficients(
      g=g, alpha=alpha, beta=g * (1.0 - a), gamma=g * (a / num_classes), scale=scale
  )


def softmax_grad_tile(
    z: jax.Array,  # (n, v) f32 soft-capped logits
    lse: jax.Array,  # (n,) f32
    is_target: jax.Array,  # (n, v) bool
    coeffs: TokenCoefficients,  # of the n tokens
    valid: jax.Array | None,  # (n, v) bool: entries that belong to this tile; None for all
    opts: LossOptions,
    uniform_in_tile: bool,
) -> tuple[jax.Array, jax.Array]:
  """The gradient of the loss w.r.t. the capped logits ``z`` and the raw logits ``x`` of a tile.

  Returns ``(dz, dx)``, both (n, v) f32 and zero outside ``valid``. The uniform label-smoothing
  term ``-gamma_n`` is included only when ``uniform_in_tile`` (i.e. with softcap); otherwise
  the caller adds it exactly outside the tiles, so that filtering can never drop it.
  """
  p = jnp.exp(z - lse[:, None])
  dz = coeffs.alpha[:, None] * p - jnp.where(is_target, coeffs.beta[:, None], 0.0)
  if uniform_in_tile:
    dz = dz - coeffs.gamma[:, None]
  if valid is not None:
    dz = jnp.where(valid, dz, 0.0)
  return dz, dz * softcap_derivative(z, opts.softcap)


def tile_is_negligible(
    dz: jax.Array,  # (n, v) f32, from softmax_grad_tile
    scale: jax.Array,  # (n,) f32, TokenCoefficients.scale
    filter_eps: float,
) -> jax.Array:
  """Whether the tile may be skipped: MATH.md's rule, read off the gradient itself.

  MATH.md skips a tile when every ``|(1 + 2 k L_n) p_nv - (1 - a)[v == t_n]|`` is below eps.
  ``dz_nv`` is ``g_n`` times that quantity (plus ``h_n p_nv`` with an lse cotangent), so the
  test is ``|dz_nv| < eps (|g_n| + |h_n|)``: every dropped entry is below eps times its row's
  cotangent. Rows with no cotangent are exactly zero and never keep a tile alive; NaN (a bad
  label) always does. Returns a () bool.
  """
  row_max = jnp.max(jnp.abs(dz), axis=1)  # (n,)
  return jnp.all((row_max < filter_eps * scale) | (row_max == 0.0))
