r"""The per-entry math of ``docs/math.md``, written once for every implementation.

Names follow ``docs/math.md``: ``x`` raw logits, ``z`` soft-capped logits, ``lse`` the
per-token log-sum-exp ``L``, ``g`` the cotangent of the per-token loss, ``h`` the cotangent of
``lse``, ``a`` label smoothing, ``k`` z-loss weight, ``s`` softcap. Everything here is f32
elementwise code on a tile of shape (tokens, classes) or on per-token vectors of shape
(tokens,). The formulas, for token ``n`` and class ``v``:

.. math::
  x_{nv} = e_n \cdot c_v + b_v, \qquad z_{nv} = s \tanh(x_{nv} / s), \qquad
  L_n = \log \sum_v e^{z_{nv}}, \qquad p_{nv} = e^{z_{nv} - L_n},

  \ell_n = L_n - (1 - a) z_{n t_n} - \frac{a}{V} \sum_v z_{nv} + k L_n^2,

  dz_{nv} = \alpha_n p_{nv} - \beta_n [v = t_n] - \gamma_n, \qquad
  dx_{nv} = dz_{nv} \left(1 - (z_{nv} / s)^2\right).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cce_jax import column_slabs, tile_dot
from cce_jax.options import LossOptions


def default_filter_eps(dtype) -> float:
  r"""The ``filter_eps`` that ``"auto"`` means for inputs of ``dtype``.

  .. math::
    \varepsilon = \operatorname{finfo}(\text{dtype}).\text{eps} / 32

  that is 2**-12 for bfloat16, 2**-15 for float16, 2**-28 for float32.

  Example:
    >>> import jax.numpy as jnp
    >>> from cce_jax import default_filter_eps
    >>> default_filter_eps(jnp.bfloat16) == 2.0**-12, default_filter_eps(jnp.float32) == 2.0**-28
    (True, True)
  """
  return float(jnp.finfo(dtype).eps) / 32.0


def apply_softcap(x: jax.Array, softcap: float | None) -> jax.Array:
  r"""The soft-capped logits, same shape and dtype as ``x``:

  .. math::
    z = s \tanh(x / s)

  with ``s = softcap``, or ``x`` itself when ``softcap`` is None.

  Example:
    >>> import jax.numpy as jnp
    >>> from cce_jax.loss_math import apply_softcap
    >>> x = jnp.array([-1000.0, 0.0, 1000.0])
    >>> apply_softcap(x, 30.0).tolist()  # saturates at +-s
    [-30.0, 0.0, 30.0]
    >>> apply_softcap(x, None) is x
    True
  """
  if softcap is None:
    return x
  return softcap * jnp.tanh(x / softcap)


def softcap_derivative(z: jax.Array, softcap: float | None) -> jax.Array | float:
  r"""The derivative of the softcap, written in terms of the capped logit ``z`` (shape of ``z``;
  the float 1.0 without softcap):

  .. math::
    \frac{dz}{dx} = 1 - \tanh^2(x / s) = 1 - (z / s)^2
  """
  if softcap is None:
    return 1.0
  return 1.0 - jnp.square(z / softcap)


def capped_logits(
  e: jax.Array,  # (n, D)
  c: jax.Array,  # (v, D) or (D, v): rows of the classifier, in opts.classifier_layout
  bias: jax.Array | None,  # (v,)
  opts: LossOptions,
  upcast: bool = False,
) -> jax.Array:
  r"""The soft-capped logits of a tile, (n, v) f32, the products accumulated in f32:

  .. math::
    z_{nv} = s \tanh\bigl((e_n \cdot c_v + b_v) / s\bigr)

  ``upcast``: 16-bit tiles multiplied in f32 (``tile_dot.tile_dot``; the same products).
  """
  dims = (((1,), (1 - opts.vocab_dim,)), ((), ()))
  x = tile_dot.tile_dot(e, c, dims, upcast)
  if bias is not None:
    x = x + bias.astype(jnp.float32)
  return apply_softcap(x, opts.softcap)


def target_logits(
  e: jax.Array,  # (n, D)
  c: jax.Array,  # (V, D) or (D, V): the whole (local) classifier
  local_labels: jax.Array,  # (n,) int, -1 where no target class is held
  bias: jax.Array | None,  # (V,)
  opts: LossOptions,
) -> jax.Array:
  r"""The soft-capped logit of each token's target by an indexed dot, (n,) f32; 0 where the
  label is -1. Gathers n rows of ``c``, never the logits:

  .. math::
    z_{n t_n} = s \tanh\bigl((e_n \cdot c_{t_n} + b_{t_n}) / s\bigr)
  """
  safe_labels = jnp.maximum(local_labels, 0)
  if opts.vocab_dim == 0:
    rows = jnp.take(c, safe_labels, axis=0)  # (n, D)
  else:
    # Columns of (D, V) by whole slabs: a column gather would make XLA:TPU transpose all of c.
    rows = column_slabs.column_rows(c, safe_labels)  # (n, D)
  x = jnp.sum(e.astype(jnp.float32) * rows.astype(jnp.float32), axis=-1)
  if bias is not None:
    x = x + bias[safe_labels].astype(jnp.float32)
  return jnp.where(local_labels >= 0, apply_softcap(x, opts.softcap), 0.0)


def token_loss(
  lse: jax.Array,  # (N,) f32
  target_logit: jax.Array,  # (N,) f32, soft-capped
  logit_sum: jax.Array | None,  # (N,) f32, sum_v z_nv; None when a == 0
  num_classes: int,
  opts: LossOptions,
) -> jax.Array:
  r"""The loss of each token before masking, (N,) f32:

  .. math::
    \ell_n = L_n - (1 - a) z_{n t_n} - \frac{a}{V} \sum_v z_{nv} + k L_n^2

  with ``L = lse``, ``a = opts.label_smoothing``, ``k = opts.z_loss`` and ``V = num_classes``.

  Example:
    >>> import jax.numpy as jnp
    >>> from cce_jax.loss_math import token_loss
    >>> from cce_jax.options import LossOptions
    >>> z = jnp.array([[2.0, 0.0, -1.0]])  # (N=1, V=3) logits, target class 0
    >>> lse = jnp.log(jnp.sum(jnp.exp(z), axis=-1))
    >>> loss = token_loss(lse, z[:, 0], None, 3, LossOptions())
    >>> bool(jnp.allclose(loss, -jnp.log(jnp.exp(2.0) / jnp.sum(jnp.exp(z)))))
    True
  """
  a, k = opts.label_smoothing, opts.z_loss
  loss = lse - (1.0 - a) * target_logit
  if a > 0.0:
    loss = loss - a * logit_sum / num_classes
  if k > 0.0:
    loss = loss + k * jnp.square(lse)
  return loss


class LabelKinds(NamedTuple):
  """Which tokens carry no loss and which carry a label outside [0, V), each (N,) bool."""

  ignored: jax.Array
  out_of_range: jax.Array


def label_kinds(labels: jax.Array, num_classes: int, ignore_index: int) -> LabelKinds:
  """Sorts labels into ignored, out of range (a bad label: NaN), and valid (neither)."""
  ignored = labels == ignore_index
  return LabelKinds(ignored, ~ignored & ((labels < 0) | (labels >= num_classes)))


def mask_token_loss(
  loss: jax.Array,  # (N,) f32
  labels: jax.Array,  # (N,) int
  num_classes: int,
  ignore_index: int,
) -> jax.Array:
  """``loss`` (N,) f32, with 0 at ignored tokens (``labels == ignore_index``) and NaN at labels
  outside [0, V) that are not ``ignore_index``."""
  kinds = label_kinds(labels, num_classes, ignore_index)
  loss = jnp.where(kinds.ignored, 0.0, loss)
  return jnp.where(kinds.out_of_range, jnp.nan, loss)


class TokenCoefficients(NamedTuple):
  r"""Per-token factors of the gradient w.r.t. the soft-capped logits, each (N,) f32:

  .. math::
    dz_{nv} = \alpha_n p_{nv} - \beta_n [v = t_n] - \gamma_n, \qquad
    \alpha_n = g_n (1 + 2 k L_n) + h_n, \quad \beta_n = (1 - a) g_n, \quad
    \gamma_n = \frac{a}{V} g_n,

  with ``g_n`` the cotangent of the per-token loss (0 at ignored tokens) and ``h_n`` that of
  the lse. ``alpha_n`` is NaN at an out-of-range label, so that a bad label poisons the
  gradient as it poisons the loss. (Over a vocabulary-sharded axis each shard's ``alpha_n``
  carries its share ``exp(L_local - L)``; see ``cce_jax.differentiable`` and the
  vocabulary-parallel section of ``docs/math.md``.)
  """

  g: jax.Array
  alpha: jax.Array
  beta: jax.Array
  gamma: jax.Array


def softmax_grad_tile(
  z: jax.Array,  # (n, v) f32 soft-capped logits
  lse: jax.Array,  # (n,) f32
  is_target: jax.Array,  # (n, v) bool
  coeffs: TokenCoefficients,  # of the n tokens
  valid: jax.Array | None,  # (n, v) bool: entries that belong to this tile; None for all
  opts: LossOptions,
  uniform_in_tile: bool,
) -> jax.Array:
  r"""The gradient of the loss w.r.t. the raw logits ``x`` of a tile, (n, v) f32:

  .. math::
    dx_{nv} = \bigl(\alpha_n p_{nv} - \beta_n [v = t_n] - \gamma_n\bigr)
      \left(1 - (z_{nv} / s)^2\right), \qquad p_{nv} = e^{z_{nv} - L_n}.

  Zero outside ``valid``. The uniform label-smoothing term ``-gamma_n`` is included only when
  ``uniform_in_tile`` (i.e. with softcap); otherwise the caller adds it exactly outside the
  tiles, so that filtering can never drop it.
  """
  p = jnp.exp(z - lse[:, None])
  dz = coeffs.alpha[:, None] * p - jnp.where(is_target, coeffs.beta[:, None], 0.0)
  if uniform_in_tile:
    dz = dz - coeffs.gamma[:, None]
  if valid is not None:
    dz = jnp.where(valid, dz, 0.0)
  return dz * softcap_derivative(z, opts.softcap)
