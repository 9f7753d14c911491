"""An independent float64 reference for the tests, written from docs/math.md.

It shares no code with cce_jax: the logits are materialized in float64 and the gradients come
from JAX's autodiff of this direct transcription of the loss, under ``jax.enable_x64``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _f64(x):
  return None if x is None else np.asarray(x, dtype=np.float64)


def loss_and_lse(
  e,
  c,
  labels,
  bias,
  *,
  ignore_index,
  softcap,
  reduction,
  shift,
  z_loss,
  label_smoothing,
  classifier_layout,
  weights=None,
):
  """The reduced loss and the per-token lse, float64 (call under jax.enable_x64).

  ``weights`` (shape of ``labels``, or None): token n's loss times ``weights[n]``; "mean"
  divides by the sum of the counted tokens' weights (0 when that is 0)."""
  classifier = c if classifier_layout == "vd" else c.T  # (V, D)
  seq_len = e.shape[-2]
  if shift:
    e = e[..., : seq_len - shift, :]
    labels = labels[..., shift:]
    weights = None if weights is None else weights[..., shift:]
  x = jnp.einsum("...d,vd->...v", e, classifier)
  if bias is not None:
    x = x + bias
  z = softcap * jnp.tanh(x / softcap) if softcap is not None else x
  lse = jax.scipy.special.logsumexp(z, axis=-1)
  num_classes = classifier.shape[0]
  target = jnp.take_along_axis(z, jnp.clip(labels, 0, num_classes - 1)[..., None], axis=-1)
  per_token = lse - (1.0 - label_smoothing) * target[..., 0] + z_loss * lse**2
  if label_smoothing:  # skipped at 0: 0 * mean(z) is NaN when a class is masked (-inf)
    per_token = per_token - label_smoothing * jnp.mean(z, axis=-1)
  kept = labels != ignore_index
  per_token = jnp.where(kept, per_token, 0.0)
  if weights is not None:
    weights = jnp.where(kept, weights, 0.0)
    per_token = per_token * weights
  if reduction == "none":
    return per_token, lse
  total = jnp.sum(per_token)
  if reduction == "sum":
    return total, lse
  count = jnp.sum(kept) if weights is None else jnp.sum(weights)
  safe_count = jnp.where(count == 0, 1.0, count)
  return jnp.where(count == 0, 0.0, total / safe_count), lse


def objective(loss, lse, loss_weights, lse_weights):
  """A scalar whose gradient exercises every output: weighted "none" losses and lse."""
  value = jnp.sum(loss * loss_weights) if loss_weights is not None else loss
  if lse_weights is not None:
    value = value + jnp.sum(lse * lse_weights)
  return value


def reference(e, c, labels, bias, *, loss_weights=None, lse_weights=None, weights=None, **options):
  """Loss, lse and gradients of ``objective`` w.r.t. (e, c, bias) and, for float per-token
  ``weights``, w.r.t. them ("d_weights"; None otherwise), as float64 numpy arrays."""
  with jax.enable_x64(True):
    w = None if weights is None else jnp.asarray(_f64(weights))
    args = (
      jnp.asarray(_f64(e)),
      jnp.asarray(_f64(c)),
      None if bias is None else jnp.asarray(_f64(bias)),
      w,
    )
    labels = jnp.asarray(np.asarray(labels))
    lw = None if loss_weights is None else jnp.asarray(_f64(loss_weights))
    hw = None if lse_weights is None else jnp.asarray(_f64(lse_weights))

    def scalar(e, c, bias, w):
      loss, lse = loss_and_lse(e, c, labels, bias, weights=w, **options)
      return objective(loss, lse, lw, hw), (loss, lse)

    (_, (loss, lse)), grads = jax.value_and_grad(scalar, argnums=(0, 1, 2, 3), has_aux=True)(*args)
    float_weights = weights is not None and np.asarray(weights).dtype != np.bool_
    return {
      "loss": np.asarray(loss),
      "lse": np.asarray(lse),
      "d_e": np.asarray(grads[0]),
      "d_c": np.asarray(grads[1]),
      "d_bias": None if bias is None else np.asarray(grads[2]),
      "d_weights": np.asarray(grads[3]) if float_weights else None,
    }


def mean_reference(e, c, labels, bias=None, **options):
  """:func:`reference` of the plain loss, with any option overridden by ``options``: by
  default the mean over the counted tokens (ignore_index -100), no softcap, shift, z-loss or
  smoothing, a (V, D) classifier."""
  plain = dict(
    ignore_index=-100,
    softcap=None,
    reduction="mean",
    shift=0,
    z_loss=0.0,
    label_smoothing=0.0,
    classifier_layout="vd",
  )
  return reference(e, c, labels, bias, **{**plain, **options})


def small_entry_bounds(e, c, labels, label_smoothing: float, eps: float):
  """Per row of dE (N,) and of dC (V,), the float64 sum of what filtering may drop from the
  mean loss's gradient: ``||dE_n(filtered) - dE_n|| <= sum_v small_nv ||c_v||`` and likewise
  for dC, where ``small_nv = |dz_nv|`` when it is below ``eps * g`` (no softcap, no bias)."""
  e64, c64 = np.asarray(e, np.float64), np.asarray(c, np.float64)
  logits = e64 @ c64.T
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  g = 1.0 / len(labels)
  onehot = np.eye(c64.shape[0])[np.asarray(labels)]
  dz = np.abs(g * (p - (1.0 - label_smoothing) * onehot))
  small = np.where(dz < eps * g, dz, 0.0)
  return small @ np.linalg.norm(c64, axis=1), small.T @ np.linalg.norm(e64, axis=1)


def assert_filtered_within_dropped_mass(d_e, d_c, exact, bounds, rounding: float = 1e-5):
  """Each row's error of filtered gradients is within its dropped mass (``bounds`` from
  :func:`small_entry_bounds`) plus f32 rounding, and filtering did change dC beyond rounding
  (so the bound was really tested)."""
  bound_e, bound_c = bounds
  err_e = np.linalg.norm(np.asarray(d_e, np.float64) - exact["d_e"], axis=1)
  err_c = np.linalg.norm(np.asarray(d_c, np.float64) - exact["d_c"], axis=1)
  assert np.all(err_e <= bound_e + rounding * np.abs(exact["d_e"]).max())
  assert np.all(err_c <= bound_c + rounding * np.abs(exact["d_c"]).max())
  assert err_c.max() > 10 * rounding * np.abs(exact["d_c"]).max()
