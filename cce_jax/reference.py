"""The materialized reference, ``impl="reference"``: all N x V logits and gradients in f32.

The obvious code, for tests and small problems, registered like every other implementation
(:class:`cce_jax.tiled.Implementation`). It is always exact (it never skips anything, whatever
``filter_eps``), its tiling is one tile of the whole (N, V) plane, and its memory grows as
N x V.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax import loss_math
from cce_jax.block_sizes import BlockSizes
from cce_jax.options import LossOptions
from cce_jax.tiled import (
  Implementation,
  LocalForward,
  LocalGrads,
  TiledInputs,
  resolve_block_sizes_of,
)


def forward(inputs: TiledInputs, opts: LossOptions, for_backward: bool) -> LocalForward:
  """The statistics of ``cce_jax.tiled.LocalForward`` from materialized logits (no
  residuals: the backward recomputes the logits)."""
  del for_backward
  e, c, local_labels, bias = inputs
  z = loss_math.capped_logits(e, c, bias, opts)  # (N, V) f32
  target = jnp.take_along_axis(z, jnp.maximum(local_labels, 0)[:, None], axis=-1)[:, 0]
  return LocalForward(
    lse=jax.nn.logsumexp(z, axis=-1),
    target=jnp.where(local_labels >= 0, target, 0.0),
    logit_sum=jnp.sum(z, axis=-1) if opts.label_smoothing > 0.0 else None,
  )


def backward(
  inputs: TiledInputs,
  residuals: None,
  lse: jax.Array,  # (N,) f32
  coeffs: loss_math.TokenCoefficients,
  filter_scale: jax.Array | None,  # (N,) f32: ignored, the reference is exact
  opts: LossOptions,
) -> LocalGrads:
  """dE (N, D) f32, dC (layout and dtype of c) and d_bias (V,) f32 from the materialized
  (N, V) softmax gradient, the uniform smoothing term included in every entry."""
  del residuals, filter_scale
  e, c, local_labels, bias = inputs
  z = loss_math.capped_logits(e, c, bias, opts)  # (N, V) f32
  is_target = local_labels[:, None] == jnp.arange(z.shape[1], dtype=jnp.int32)[None, :]
  dx = loss_math.softmax_grad_tile(z, lse, is_target, coeffs, None, opts, True)  # (N, V)
  f32, exact = jnp.float32, lax.Precision.HIGHEST
  c32 = c.astype(f32)
  d_e = jnp.matmul(dx, c32 if opts.vocab_dim == 0 else c32.T, precision=exact)  # (N, D)
  d_c = jnp.matmul(dx.T, e.astype(f32), precision=exact)  # (V, D)
  if opts.vocab_dim == 1:
    d_c = d_c.T
  d_bias = None if bias is None else jnp.sum(dx, axis=0)
  return LocalGrads(d_e=d_e, d_c=d_c.astype(c.dtype), d_bias=d_bias)


def skip_table(
  inputs: TiledInputs,
  filter_scale: Callable[[jax.Array], jax.Array],
  opts: LossOptions,
) -> jax.Array:
  """(1, 1) bool False: one tile, never skipped."""
  del inputs, filter_scale, opts
  return jnp.zeros((1, 1), bool)


IMPLEMENTATION = Implementation(
  name="reference",
  forward=forward,
  backward=backward,
  skip_table=skip_table,
  # Block sizes mean nothing here; cce_jax.BlockSizes is accepted as for "xla".
  resolve_block_sizes=resolve_block_sizes_of(BlockSizes, BlockSizes.get_default),
)
