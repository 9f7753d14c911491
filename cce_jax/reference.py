"""The materialized reference: all N x V logits in f32, differentiated by JAX.

The obvious code, for tests and small problems. It ignores ``filter_eps`` (it is always exact)
and its memory grows as N x V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cce_jax import loss_math
from cce_jax.options import LossOptions
from cce_jax.tiled import LocalForward


def local_stats(
    e: jax.Array,  # (N, D)
    c: jax.Array,  # (V, D) or (D, V)
    local_labels: jax.Array,  # (N,) int32, -1 where this classifier holds no target
    bias: jax.Array | None,  # (V,)
    opts: LossOptions,
) -> LocalForward:
  """The statistics of ``cce_jax.tiled.LocalForward`` from materialized logits (no residuals)."""
  z = loss_math.capped_logits(e, c, bias, opts)  # (N, V) f32
  target = jnp.take_along_axis(z, jnp.maximum(local_labels, 0)[:, None], axis=-1)[:, 0]
  return LocalForward(
      lse=jax.nn.logsumexp(z, axis=-1),
      target=jnp.where(local_labels >= 0, target, 0.0),
      logit_sum=jnp.sum(z, axis=-1) if opts.label_smoothing > 0.0 else None,
  )
