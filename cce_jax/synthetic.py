"""Synthetic inputs for tests and benchmarks: uniform, and shaped like a trained LM's head.

``trained_like_inputs`` builds hidden states and a classifier whose logits look like those of a
trained language model, so that gradient filtering and the vocabulary sort can be measured
without a trained model:

* each class ``v`` gets a Zipf rank ``r_v`` (a random permutation, so that frequent classes are
  scattered over the ids and the vocabulary sort has work to do), and a unigram log-prior
  ``prior_v = -zipf_exponent * log(r_v) * logit_scale``;
* targets are drawn from the same Zipf law (``P(r) ~ r**-zipf_exponent``);
* the logits come out as ``x_nv ~ prior_v + margin * logit_scale * [v == t_n] + noise``, with
  ``noise_std * logit_scale`` Gaussian noise per entry, built as real dot products
  ``e_n . c_v`` in D dimensions: ``c_v = prior_v u + W_v``, ``e_n = u + m W_{t_n} / |W_{t_n}|^2 +
  noise``, with ``u`` a unit direction and ``W`` random rows orthogonal to it.

The defaults give a peaked softmax as a trained LM has (measured at N=1024, D=256, V=32768):
mean entropy 1.3 nats, median target probability 0.55, 99.85% of the entries below 2**-12 and
45% below 2**-28 (the float32 default ``filter_eps``).
:func:`softmax_summary` prints those statistics so that a benchmark states what it ran on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def uniform_inputs(
  key: jax.Array, num_tokens: int, hidden: int, num_classes: int, dtype=jnp.float32
):
  """``e`` (N, D) and ``c`` (V, D) with i.i.d. N(0, 1/sqrt(D)) entries, uniform labels (N,)."""
  k_e, k_c, k_y = jax.random.split(key, 3)
  scale = hidden**-0.25
  e = (scale * jax.random.normal(k_e, (num_tokens, hidden))).astype(dtype)
  c = (scale * jax.random.normal(k_c, (num_classes, hidden))).astype(dtype)
  labels = jax.random.randint(k_y, (num_tokens,), 0, num_classes, dtype=jnp.int32)
  return e, c, labels


def trained_like_inputs(
  key: jax.Array,
  num_tokens: int,
  hidden: int,
  num_classes: int,
  dtype=jnp.float32,
  *,
  zipf_exponent: float = 1.1,
  logit_scale: float = 1.5,
  margin: float = 5.0,
  noise_std: float = 1.0,
):
  """``e`` (N, D), ``c`` (V, D) and labels (N,) int32 with trained-LM-like logits (module doc)."""
  k_rank, k_y, k_u, k_w, k_noise = jax.random.split(key, 5)
  # The Zipf rank of each class id (1 = most frequent).
  ranks = jax.random.permutation(k_rank, num_classes) + 1
  log_rank = jnp.log(ranks.astype(jnp.float32))
  prior = -zipf_exponent * log_rank * logit_scale  # (V,)
  prior = prior - jnp.mean(prior)

  # Targets: Zipf over ranks, mapped back to class ids.
  rank_logits = -zipf_exponent * jnp.log(jnp.arange(1, num_classes + 1, dtype=jnp.float32))
  target_rank = jax.random.categorical(k_y, rank_logits, shape=(num_tokens,)) + 1
  class_of_rank = jnp.argsort(ranks)  # class id holding rank r at index r - 1
  labels = class_of_rank[target_rank - 1].astype(jnp.int32)

  u = jax.random.normal(k_u, (hidden,))
  u = u / jnp.linalg.norm(u)
  w = jax.random.normal(k_w, (num_classes, hidden)) / np.sqrt(hidden)
  w = w - (w @ u)[:, None] * u[None, :]  # rows orthogonal to u, |w_v| ~ 1
  c = prior[:, None] * u[None, :] + w
  w_target = w[labels]
  e_signal = margin * logit_scale * w_target / jnp.sum(w_target**2, axis=1, keepdims=True)
  noise = jax.random.normal(k_noise, (num_tokens, hidden)) * noise_std * logit_scale
  noise = noise - (noise @ u)[:, None] * u[None, :]
  e = u[None, :] + e_signal + noise
  return e.astype(dtype), c.astype(dtype), labels


def softmax_summary(e: jax.Array, c: jax.Array, labels: jax.Array, eps: float = 2.0**-12) -> dict:
  """Entropy, target probability and the fraction of softmax entries below ``eps`` (f32)."""
  logits = jnp.dot(e.astype(jnp.float32), c.astype(jnp.float32).T)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(log_p)
  return {
    "mean_entropy_nats": float(-jnp.mean(jnp.sum(p * log_p, axis=-1))),
    "median_target_prob": float(jnp.median(jnp.take_along_axis(p, labels[:, None], 1))),
    "fraction_below_eps": float(jnp.mean(p < eps)),
  }
