"""An independent float64 reference of ``cce_jax.token_stats``, from the materialized logits.

It shares no code with cce_jax: the logits are built in float64, the softmax by
``jax.nn.softmax`` and the entropy as ``-sum p log p`` over the classes with ``p > 0``; the
gradients come from JAX's autodiff of this transcription, under ``jax.enable_x64``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _f64(x):
  return None if x is None else jnp.asarray(np.asarray(x, dtype=np.float64))


def _fields(e, c, labels, bias, *, ignore_index, softcap, shift, classifier_layout):
  """lse, entropy, label logprob (0 ignored, NaN out of range) and logits, float64."""
  classifier = c if classifier_layout == "vd" else c.T  # (V, D)
  seq_len = e.shape[-2]
  e = e[..., : seq_len - shift, :]
  x = jnp.einsum("...d,vd->...v", e, classifier)
  if bias is not None:
    x = x + bias
  z = softcap * jnp.tanh(x / softcap) if softcap is not None else x
  p = jax.nn.softmax(z, axis=-1)
  log_p = jax.nn.log_softmax(z, axis=-1)
  safe_log_p = jnp.where(p > 0, log_p, 0.0)  # -inf at masked classes, where p is 0
  entropy = -jnp.sum(p * safe_log_p, axis=-1)
  lse = jax.scipy.special.logsumexp(z, axis=-1)
  logprob = None
  if labels is not None:
    labels = labels[..., shift:]
    num_classes = classifier.shape[0]
    picked = jnp.take_along_axis(log_p, jnp.clip(labels, 0, num_classes - 1)[..., None], -1)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    logprob = jnp.where(labels == ignore_index, 0.0, jnp.where(bad, jnp.nan, picked[..., 0]))
  return lse, entropy, logprob, z


def stats(
  e, c, labels=None, bias=None, *, ignore_index=-100, softcap=None, shift=0, classifier_layout="vd"
):
  """dict of float64 numpy ``lse``, ``entropy``, ``logprob`` (None without labels) and the
  logits ``z`` (for argmax checks), shape (..., T - shift[, V])."""
  options = dict(
    ignore_index=ignore_index, softcap=softcap, shift=shift, classifier_layout=classifier_layout
  )
  with jax.enable_x64(True):
    labels = None if labels is None else jnp.asarray(np.asarray(labels))
    lse, entropy, logprob, z = _fields(_f64(e), _f64(c), labels, _f64(bias), **options)
    out = {"lse": lse, "entropy": entropy, "logprob": logprob, "z": z}
    return {k: None if v is None else np.asarray(v) for k, v in out.items()}


def stats_grads(
  e, c, labels, bias, weights, *, ignore_index=-100, softcap=None, shift=0, classifier_layout="vd"
):
  """Gradients w.r.t. (e, c, bias) of ``sum(w_lse lse + w_entropy entropy + w_logprob
  logprob)`` over the counted tokens (logprob's terms) and all tokens (lse, entropy), with
  ``weights`` a dict of float arrays of the output shape; float64 numpy, bias' None if None."""
  options = dict(
    ignore_index=ignore_index, softcap=softcap, shift=shift, classifier_layout=classifier_layout
  )
  with jax.enable_x64(True):
    labels = jnp.asarray(np.asarray(labels))
    w = {k: _f64(v) for k, v in weights.items()}

    def objective(e, c, bias):
      lse, entropy, logprob, _ = _fields(e, c, labels, bias, **options)
      counted = labels[..., shift:] != ignore_index
      value = jnp.sum(w["lse"] * lse) + jnp.sum(w["entropy"] * entropy)
      return value + jnp.sum(jnp.where(counted, w["logprob"] * logprob, 0.0))

    argnums = (0, 1, 2) if bias is not None else (0, 1)
    grads = jax.grad(objective, argnums=argnums)(_f64(e), _f64(c), _f64(bias))
    grads = [np.asarray(g) for g in grads]
    return {"d_e": grads[0], "d_c": grads[1], "d_bias": grads[2] if bias is not None else None}
