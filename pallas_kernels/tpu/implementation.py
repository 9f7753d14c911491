"""``impl="pallas_tpu"``: the :mod:`cce_jax.tiled` contract on the kernels of :mod:`.kernels`.

The thin JAX around the kernels: argument checks, the tile choice (:func:`.block_sizes.resolve`),
the target logit (an indexed dot, ``loss_math.target_logits``), the vocabulary sort, the skip
table, and the exact label-smoothing term.

Vocabulary sort: a temporary permuted copy of ``c``. Mosaic cannot gather rows inside a kernel,
and the alternatives cost more than the copy: per-row DMA from HBM would issue V row copies
per token block in the forward and in the dE kernel (each re-reads every class block once per
token block); a block-level order reorders whole blocks, which changes no tile's contents and
so skips nothing more. So when a backward will filter (``opts.sort_vocab`` and
``opts.filters_anything``), the forward and the backward each gather ``c`` (and ``bias``) into
descending-average-logit order (:func:`cce_jax.vocab_sort.vocab_order`) and run the kernels on
the copy; the dC kernel writes dC in that order and one gather by the inverse permutation
puts it back. Memory: one (V, D) array in c's dtype beyond the gradients at any time (the sorted
``c`` while the kernels run, then the sorted dC while it is gathered back; measured with
``memory_analysis()`` of loss+grad in interpret mode at N=1024, D=512, V=16384 f32: 35.6 MiB
of temporaries sorted, 4.2 MiB unsorted, V x D x 4 = 32 MiB); 1.18 GB at the paper's bf16
shape (V=256000, D=2304). Nothing of that size is kept from forward to backward (the
residuals are the (V,) order and the (N, V / vocab_block) block maxima). Without filtering
nothing is sorted or copied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax import loss_math, vocab_sort
from cce_jax.options import LossOptions
from cce_jax.tiled import LocalForward, LocalGrads, Residuals
from pallas_kernels.tpu import kernels
from pallas_kernels.tpu.block_sizes import TPUBlockSizes, resolve
from pallas_kernels.tpu.kernels import Geometry, Math

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def check_inputs(e: jax.Array, c: jax.Array, opts: LossOptions) -> None:
  """Raises for what this implementation does not take.

  Raises:
    TypeError: ``e`` not float32 or bfloat16 (TPUs have no float16 arithmetic: use bfloat16),
      or ``opts.block_sizes`` not a :class:`TPUBlockSizes`.
  """
  if jnp.dtype(e.dtype) not in SUPPORTED_DTYPES:
    raise TypeError(
        f"impl='pallas_tpu' takes float32 or bfloat16 `e` and `c`, got {jnp.dtype(e.dtype).name}"
        " (TPUs have no float16 arithmetic; use bfloat16, or impl='xla')."
    )
  if not isinstance(opts.block_sizes, TPUBlockSizes):
    raise TypeError(
        "impl='pallas_tpu' takes `block_sizes` of type pallas_kernels.tpu.TPUBlockSizes, got "
        f"{type(opts.block_sizes).__name__} ({opts.block_sizes!r})."
    )
  del c


def geometry(e: jax.Array, c: jax.Array, opts: LossOptions) -> Geometry:
  """Sizes and tiles of a call (raises ValueError when the tiles do not fit VMEM)."""
  num_tokens, hidden = e.shape
  num_classes = c.shape[opts.vocab_dim]
  tiles = resolve(opts.block_sizes, num_tokens, hidden, num_classes, e.dtype)
  return Geometry(num_tokens, num_classes, hidden, opts.vocab_dim, tiles)


def _math(e: jax.Array, bias: jax.Array | None, opts: LossOptions) -> Math:
  return Math(
      softcap=opts.softcap,
      with_bias=bias is not None,
      uniform_in_tile=opts.label_smoothing > 0.0 and opts.softcap is not None,
      precision=lax.Precision.HIGHEST if e.dtype == jnp.float32 else None,
  )


def _sorted(c, bias, order, opts: LossOptions):
  """``c`` and ``bias`` with the classes in ``order`` (the identity when None)."""
  if order is None:
    return c, bias
  return jnp.take(c, order, axis=opts.vocab_dim), None if bias is None else bias[order]


def sorts_vocabulary(opts: LossOptions) -> bool:
  """Whether a forward for a backward sorts the vocabulary (only when tiles can be skipped)."""
  return opts.sort_vocab and opts.filters_anything


def forward(
    e: jax.Array,  # (N, D)
    c: jax.Array,  # (V, D) or (D, V)
    local_labels: jax.Array,  # (N,) int32, -1 where no target class is held
    bias: jax.Array | None,  # (V,)
    opts: LossOptions,
    for_backward: bool,
) -> LocalForward:
  """Per-token lse, target logit and logit sum (``cce_jax.tiled.LocalForward``).

  For a backward that filters, the kernel also records the maximum logit of every token and
  vocabulary block (in the sorted order when ``opts.sort_vocab``).

  Raises:
    TypeError, ValueError: see :func:`check_inputs` and :func:`.block_sizes.resolve`.
  """
  check_inputs(e, c, opts)
  geo = geometry(e, c, opts)
  want_block_max = for_backward and opts.filters_anything
  order = vocab_sort.vocab_order(e, c, bias, opts) if for_backward and sorts_vocabulary(
      opts) else None
  c_run, bias_run = _sorted(c, bias, order, opts)
  lse, logit_sum, block_max = kernels.forward_stats(
      e, c_run, bias_run, geo, _math(e, bias, opts),
      with_logit_sum=opts.label_smoothing > 0.0, with_block_max=want_block_max,
      interpret=opts.interpret,
  )
  target = loss_math.target_logits(e, c, local_labels, bias, opts)
  return LocalForward(
      lse=lse,
      target=target,
      logit_sum=logit_sum,
      residuals=Residuals(order, block_max) if for_backward else None,
  )


def _positions(order: jax.Array) -> jax.Array:
  """(V,) int32: the tile column of each class, the inverse permutation of ``order``."""
  num_classes = order.shape[0]
  return jnp.zeros((num_classes,), jnp.int32).at[order].set(
      jnp.arange(num_classes, dtype=jnp.int32))


def skip_table(
    block_max: jax.Array,  # (N, vocab blocks) f32
    lse: jax.Array,  # (N,) f32
    filter_scale: jax.Array,  # (N,) f32
    tile_labels: jax.Array,  # (N,) int32: tile column of the target, -1 for none
    geo: Geometry,
    opts: LossOptions,
) -> jax.Array:
  """(token blocks, vocab blocks) bool: the tiles the backward may skip (``cce_jax.tiled``'s
  rule: no row's target in the tile, and ``filter_scale * exp(block max - lse) < filter_eps``
  for every row; NaN and inf never let a tile go)."""
  t = geo.tiles
  bound = filter_scale[:, None] * jnp.exp(block_max - lse[:, None])  # (N, nv)
  small = bound < opts.filter_eps
  padded_tokens = t.num_token_blocks * t.token_block
  small = jnp.pad(small, ((0, padded_tokens - geo.num_tokens), (0, 0)), constant_values=True)
  all_small = jnp.all(small.reshape(t.num_token_blocks, t.token_block, -1), axis=1)
  token_block = jnp.arange(geo.num_tokens, dtype=jnp.int32) // t.token_block
  target_block = jnp.where(tile_labels >= 0, tile_labels // t.vocab_block, t.num_vocab_blocks)
  holds_target = jnp.zeros(all_small.shape, bool).at[token_block, target_block].set(
      True, mode="drop")
  return all_small & ~holds_target


def pack_skip_table(skip: jax.Array, geo: Geometry) -> jax.Array:
  """(token blocks * skip words,) int32: bit ``j % 32`` of word ``i * words + j // 32`` is
  ``skip[i, j]`` (one SMEM word per 32 tiles)."""
  words = geo.skip_words
  skip = jnp.pad(skip, ((0, 0), (0, words * kernels.SKIP_BITS - skip.shape[1])))
  bits = skip.reshape(skip.shape[0], words, kernels.SKIP_BITS).astype(jnp.uint32)
  packed = jnp.sum(bits << jnp.arange(kernels.SKIP_BITS, dtype=jnp.uint32), axis=-1,
                   dtype=jnp.uint32)
  return lax.bitcast_convert_type(packed, jnp.int32).reshape(-1)


def backward(
    e: jax.Array,  # (N, D)
    c: jax.Array,  # (V, D) or (D, V)
    local_labels: jax.Array,  # (N,) int32
    bias: jax.Array | None,  # (V,)
    residuals: Residuals,
    lse: jax.Array,  # (N,) f32
    coeffs: loss_math.TokenCoefficients,
    filter_scale: jax.Array | None,  # (N,) f32
    opts: LossOptions,
) -> LocalGrads:
  """Gradients w.r.t. ``e``, ``c`` and ``bias`` (``cce_jax.tiled.BackwardFn``).

  dE comes from :func:`.kernels.grad_e` (skipping the skip table's tiles when
  ``opts.filter_e_grad``), dC and dbias from :func:`.kernels.grad_c` (when
  ``opts.filter_c_grad``; a skipped tile's bias-gradient entries go with it). Without softcap
  the uniform label-smoothing term is added exactly outside the tiles.
  """
  check_inputs(e, c, opts)
  geo = geometry(e, c, opts)
  math = _math(e, bias, opts)
  order = None if residuals is None else residuals.order
  c_run, bias_run = _sorted(c, bias, order, opts)
  positions = None if order is None else _positions(order)
  tile_labels = local_labels if positions is None else jnp.where(
      local_labels >= 0, positions[jnp.maximum(local_labels, 0)], -1)
  uniform_outside = opts.label_smoothing > 0.0 and opts.softcap is None
  gamma_in_tile = coeffs.gamma if math.uniform_in_tile else jnp.zeros_like(coeffs.gamma)
  token_stats = jnp.stack([lse, coeffs.alpha, coeffs.beta, gamma_in_tile], axis=1)  # (N, 4)

  skip_bits = None
  if filter_scale is not None and residuals is not None and residuals.block_max is not None:
    if residuals.block_max.shape[1] != geo.tiles.num_vocab_blocks:
      raise AssertionError(  # the tile choice must not depend on N (block_sizes.resolve)
          f"block maxima of {residuals.block_max.shape[1]} vocabulary blocks for "
          f"{geo.tiles.num_vocab_blocks} blocks in the backward")
    skip = skip_table(residuals.block_max, lse, filter_scale, tile_labels, geo, opts)
    skip_bits = pack_skip_table(skip, geo)

  d_e = kernels.grad_e(
      e, c_run, bias_run, token_stats, tile_labels,
      skip_bits if opts.filter_e_grad else None, geo, math, opts.interpret,
  )
  class_offset = coeffs.gamma @ e.astype(jnp.float32) if uniform_outside else None  # (D,)
  d_c, d_bias = kernels.grad_c(
      e, c_run, bias_run, token_stats, tile_labels,
      skip_bits if opts.filter_c_grad else None, class_offset, geo, math, opts.interpret,
  )
  if positions is not None:
    d_c = jnp.take(d_c, positions, axis=opts.vocab_dim)
    d_bias = None if d_bias is None else d_bias[positions]
  if uniform_outside:
    # The uniform smoothing term, exactly (docs/math.md).
    class_sum = jnp.sum(c.astype(jnp.float32), axis=opts.vocab_dim)  # (D,)
    d_e = d_e - coeffs.gamma[:, None] * class_sum[None, :]
    if d_bias is not None:
      d_bias = d_bias - jnp.sum(coeffs.gamma)
  return LocalGrads(d_e=d_e, d_c=d_c, d_bias=d_bias)


def skipped_tiles(
    e: jax.Array,  # (N, D)
    c: jax.Array,  # (V, D) or (D, V)
    local_labels: jax.Array,  # (N,) int32
    bias: jax.Array | None,  # (V,)
    filter_scale,  # (N,) lse -> (N,) filter scale
    opts: LossOptions,
) -> jax.Array:
  """(token blocks, vocab blocks) bool: the tiles a backward of these inputs skips (runs the
  forward kernel; all False when nothing filters)."""
  check_inputs(e, c, opts)
  geo = geometry(e, c, opts)
  shape = (geo.tiles.num_token_blocks, geo.tiles.num_vocab_blocks)
  if not opts.filters_anything:
    return jnp.zeros(shape, bool)
  fwd = forward(e, c, local_labels, bias, opts, for_backward=True)
  order = fwd.residuals.order
  tile_labels = local_labels if order is None else jnp.where(
      local_labels >= 0, _positions(order)[jnp.maximum(local_labels, 0)], -1)
  return skip_table(fwd.residuals.block_max, fwd.lse, filter_scale(fwd.lse), tile_labels, geo,
                    opts)
