"""The vocabulary sort: the class order in which a backward visits the classifier.

Visiting classes by descending average logit puts the few classes with non-negligible
probability into the same tiles, so that the rest of the tiles can be skipped together
(``docs/math.md``, "The vocabulary sort").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax import column_slabs, tile_dot
from cce_jax.options import LossOptions


def vocab_order(
  e: jax.Array,  # (N, D)
  c: jax.Array,  # (V, D) or (D, V)
  bias: jax.Array | None,  # (V,)
  opts: LossOptions,
  slab_width: int | None = None,
) -> jax.Array:
  """The backward's class order, (V,) int32: descending average logit over the tokens.

  The average raw logit is linear in ``e``: ``mean_n(e_n . c_v) + b_v = c_v . mean_n(e_n) +
  b_v``, so it is computed exactly, before the forward, with one matrix-vector product. (With
  softcap it is the average of the uncapped logit, which orders the classes alike.) The
  identity when ``opts.sort_vocab`` is False.

  With ``slab_width`` (a (D, V) classifier, V a multiple of it) whole slabs of that many
  consecutive classes are ordered by their best average logit (``column_slabs.slab_order``),
  so that a tile is read from ``c`` slab by slab.
  """
  num_classes = c.shape[opts.vocab_dim]
  if not opts.sort_vocab:
    return jnp.arange(num_classes, dtype=jnp.int32)
  mean_e = jnp.mean(e.astype(jnp.float32), axis=0)  # (D,)
  # mean_e is rounded to c's dtype (an f32 copy of c would cost V x D): fine for an ordering.
  mean_e = mean_e.astype(c.dtype)
  hidden_dim = 1 - opts.vocab_dim

  def product_score(c, mean_e):  # (V,) f32
    dims = (((hidden_dim,), (0,)), ((), ()))
    return lax.dot_general(c, mean_e, dims, preferred_element_type=jnp.float32)

  def reduced_score(c, mean_e):  # (V,) f32: the same f32 products, in one fused reduction
    expanded = jnp.expand_dims(mean_e, opts.vocab_dim).astype(jnp.float32)
    return jnp.sum(c.astype(jnp.float32) * expanded, axis=hidden_dim)

  if jnp.dtype(c.dtype) in tile_dot.SIXTEEN_BIT_FLOATS:
    # XLA:CPU has no 16-bit matrix product: for one it would convert all of c to f32
    # (V x D x 4 bytes). Decided where the program is lowered, also for jax.export.
    score = lax.platform_dependent(c, mean_e, cpu=reduced_score, default=product_score)
  else:
    score = product_score(c, mean_e)
  if bias is not None:
    score = score + bias.astype(jnp.float32)
  if slab_width is not None:
    return column_slabs.slab_order(score, slab_width)
  return jnp.argsort(-score, stable=True).astype(jnp.int32)
