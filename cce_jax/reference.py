"""The materialized reference: all N x V logits in f32, differentiated by JAX.

The obvious code, for tests and small problems. It ignores ``filter_eps`` (it is always exact)
and its memory grows as N x V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cce_jax import loss_math
from cce_jax.options import LossOptions


def reference_token_loss(
    e: jax.Array,  # (N, D)
    c: jax.Array,  # (V, D) or (D, V)
    labels: jax.Array,  # (N,) int
    bias: jax.Array | None,  # (V,)
    opts: LossOptions,
    return_lse: bool,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Per-token loss, (N,) f32, and with ``return_lse`` the lse, from materialized logits."""
  num_classes = c.shape[opts.vocab_dim]
  z = loss_math.capped_logits(e, c, bias, opts)  # (N, V)
  lse = jax.nn.logsumexp(z, axis=-1)
  safe_labels = jnp.clip(labels, 0, num_classes - 1)
  target_logit = jnp.take_along_axis(z, safe_labels[:, None], axis=-1)[:, 0]
  # A label outside [0, V) poisons the gradients too, not only the (masked) loss value.
  out_of_range = loss_math.label_kinds(labels, num_classes, opts.ignore_index).out_of_range
  target_logit = target_logit * jnp.where(out_of_range, jnp.nan, 1.0)
  logit_sum = jnp.sum(z, axis=-1) if opts.label_smoothing > 0.0 else None
  loss = loss_math.token_loss(lse, target_logit, logit_sum, num_classes, opts)
  loss = loss_math.mask_token_loss(loss, labels, num_classes, opts.ignore_index)
  return (loss, lse) if return_lse else loss
