"""``impl="pallas_tpu"``: ``cce_jax.tiled``'s contract on the kernels of :mod:`.kernels`.

The thin JAX around the kernels: argument checks, the tile choice (:func:`.block_sizes.resolve`),
the target logit (an indexed dot, ``loss_math.target_logits``), the vocabulary sort, and
``cce_jax.filtering``'s skip table (packed into bits, :func:`pack_skip_table`) and exact
label-smoothing term. Both axes use the "mask" tiling (``cce_jax.filtering.AxisTiling``).

Vocabulary sort (when a backward will filter: ``opts.sort_vocab`` and
``opts.filters_anything``): by default (``TPUBlockSizes.vocab_sort_group`` = 16) the classes
are sorted by aligned groups of 16 rows of ``c`` (:func:`cce_jax.vocab_sort.vocab_order` with
``slab_width``), which the kernels read from ``c`` in HBM by DMA, and dC is written back to the
same rows: no copy of ``c``. Mosaic can move only whole (16, 128) tiles of rows, so a per-class
order (``vocab_sort_group=1``; also where groups cannot be read: a (D, V) classifier, V not a
multiple of the group) instead gathers ``c`` (and ``bias``) into a temporary sorted copy in the
forward and the backward, and gathers dC back by the inverse permutation
(``cce_jax.filtering.positions``): one (V, D) array in c's dtype at peak. ``docs/tpu_backend.md``
compares the two.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax import filtering, loss_math, vocab_sort
from cce_jax.filtering import AxisTiling
from cce_jax.options import LossOptions
from cce_jax.tiled import (
  LocalForward,
  LocalGrads,
  Residuals,
  TiledInputs,
  resolve_block_sizes_of,
)
from pallas_kernels.tpu import kernels
from pallas_kernels.tpu.block_sizes import TPUBlockSizes, resolve
from pallas_kernels.tpu.kernels import Geometry, Math

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def check_inputs(e: jax.Array, c: jax.Array, opts: LossOptions) -> None:
  """Raises for what this implementation does not take.

  Raises:
    TypeError: ``e`` not float32 or bfloat16 (TPUs have no float16 arithmetic: use bfloat16;
      the kernels have no float64: cast to float32),
      or ``opts.block_sizes`` not a :class:`TPUBlockSizes`.
  """
  dtype = jnp.dtype(e.dtype)
  if dtype not in SUPPORTED_DTYPES:
    advice = {
      jnp.dtype(jnp.float16): "TPUs have no float16 arithmetic; use bfloat16, or impl='xla'",
      jnp.dtype(jnp.float64): (
        "the TPU kernels have no float64; cast to float32, or use impl='xla' or "
        "impl='reference' for float64"
      ),
    }.get(dtype, "use impl='xla'")
    raise TypeError(
      f"impl='pallas_tpu' takes float32 or bfloat16 `e` and `c`, got {dtype.name} ({advice})."
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
  group = opts.block_sizes.vocab_sort_group
  grouped = (  # the kernels may read c by groups (sort_group decides once the tiles are known)
    sorts_vocabulary(opts) and opts.vocab_dim == 0 and group > 1 and num_classes % group == 0
  )
  tiles = resolve(opts.block_sizes, num_tokens, hidden, num_classes, e.dtype, grouped)
  return Geometry(num_tokens, num_classes, hidden, opts.vocab_dim, tiles)


def tilings(geo: Geometry) -> tuple[AxisTiling, AxisTiling]:
  """The (tokens, classes) tilings of the kernels: both masked."""
  t = geo.tiles
  return (
    AxisTiling(geo.num_tokens, t.token_block, "mask"),
    AxisTiling(geo.num_classes, t.vocab_block, "mask"),
  )


def _math(e: jax.Array, bias: jax.Array | None, opts: LossOptions) -> Math:
  return Math(
    softcap=opts.softcap,
    with_bias=bias is not None,
    uniform_in_tile=filtering.uniform_in_tile(opts),
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


def sort_group(geo: Geometry, opts: LossOptions) -> int | None:
  """Classes per group of the grouped vocabulary sort (``TPUBlockSizes.vocab_sort_group``), or
  None for the per-class sort on a sorted copy of ``c``: also where the kernels cannot read
  ``c`` by groups (``kernels.grouped_reads_supported``) or V is not a multiple of the group."""
  group = opts.block_sizes.vocab_sort_group
  if group == 1 or geo.num_classes % group or not kernels.grouped_reads_supported(geo):
    return None
  return group


def group_order(order: jax.Array) -> jax.Array:
  """(V / GROUP_ROWS,) int32: the ``kernels.GROUP_ROWS``-row groups of ``c`` in the visiting
  ``order`` (a :func:`cce_jax.column_slabs.slab_order` of a multiple of ``GROUP_ROWS``)."""
  return (order[:: kernels.GROUP_ROWS] // kernels.GROUP_ROWS).astype(jnp.int32)


def _visit(c, bias, order, group: int | None, opts: LossOptions):
  """(c, bias, group order) for the kernels: a grouped sort leaves ``c`` in place (the kernels
  read it by groups) and permutes only ``bias``; the per-class sort copies both."""
  if order is None or group is None:
    return (*_sorted(c, bias, order, opts), None)
  return c, None if bias is None else bias[order], group_order(order)


def backward_block_max(block_max: jax.Array, geo: Geometry) -> jax.Array:
  """(N, vocab blocks) f32: the forward's block maxima (N, forward vocabulary blocks), merged
  into the backward's vocabulary blocks (each a whole number of the forward's)."""
  t = geo.tiles
  forward = t.for_forward()
  per_block = t.vocab_block // forward.vocab_block
  if per_block == 1:
    return block_max
  num_tokens = block_max.shape[0]
  pad = t.num_vocab_blocks * per_block - forward.num_vocab_blocks
  block_max = jnp.pad(block_max, ((0, 0), (0, pad)), constant_values=-jnp.inf)
  return jnp.max(block_max.reshape(num_tokens, t.num_vocab_blocks, per_block), axis=2)


def forward(inputs: TiledInputs, opts: LossOptions, for_backward: bool) -> LocalForward:
  """Per-token lse, target logit and logit sum (``cce_jax.tiled.LocalForward``).

  For a backward that filters, the kernel also records the maximum logit of every token and
  vocabulary block (in the sorted order when ``opts.sort_vocab``).

  Raises:
    TypeError, ValueError: see :func:`check_inputs` and :func:`.block_sizes.resolve`.
  """
  e, c, local_labels, bias = inputs  # (N, D), (V, D) or (D, V), (N,), (V,) or None
  check_inputs(e, c, opts)
  geo = geometry(e, c, opts)
  want_block_max = for_backward and opts.filters_anything
  group = sort_group(geo, opts)
  order = (
    vocab_sort.vocab_order(e, c, bias, opts, slab_width=group)
    if for_backward and sorts_vocabulary(opts)
    else None
  )
  c_run, bias_run, groups = _visit(c, bias, order, group, opts)
  lse, logit_sum, block_max = kernels.forward_stats(
    e,
    c_run,
    bias_run,
    geo,
    _math(e, bias, opts),
    with_logit_sum=opts.label_smoothing > 0.0,
    with_block_max=want_block_max,
    interpret=opts.interpret,
    group_order=groups,
  )
  if block_max is not None:
    block_max = backward_block_max(block_max, geo)
  target = loss_math.target_logits(e, c, local_labels, bias, opts)
  return LocalForward(
    lse=lse,
    target=target,
    logit_sum=logit_sum,
    residuals=Residuals(order, block_max) if for_backward else None,
  )


def pack_skip_table(skip: jax.Array, geo: Geometry) -> jax.Array:
  """(token blocks * skip words,) int32: bit ``j % 32`` of word ``i * words + j // 32`` is
  ``skip[i, j]`` (one SMEM word per 32 tiles)."""
  words = geo.skip_words
  skip = jnp.pad(skip, ((0, 0), (0, words * kernels.SKIP_BITS - skip.shape[1])))
  bits = skip.reshape(skip.shape[0], words, kernels.SKIP_BITS).astype(jnp.uint32)
  packed = jnp.sum(
    bits << jnp.arange(kernels.SKIP_BITS, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32
  )
  return lax.bitcast_convert_type(packed, jnp.int32).reshape(-1)


def backward(
  inputs: TiledInputs,
  residuals: Residuals,
  lse: jax.Array,  # (N,) f32
  coeffs: loss_math.TokenCoefficients,
  filter_scale: jax.Array | None,  # (N,) f32
  opts: LossOptions,
) -> LocalGrads:
  """Gradients w.r.t. ``e``, ``c`` and ``bias`` (``cce_jax.tiled.BackwardFn``).

  One kernel, :func:`.kernels.grads`, computes each tile's logits once for dE, dC and dbias;
  a tile of the skip table skips its dE product when ``opts.filter_e_grad``, its dC and dbias
  products when ``opts.filter_c_grad``, and its logits when both. Without softcap
  the uniform label-smoothing term is added exactly outside the tiles.
  """
  e, c, local_labels, bias = inputs
  check_inputs(e, c, opts)
  geo = geometry(e, c, opts)
  math = _math(e, bias, opts)
  order = None if residuals is None else residuals.order
  c_run, bias_run, groups = _visit(c, bias, order, sort_group(geo, opts), opts)
  tile_labels = filtering.tile_columns(local_labels, order)  # (N,) positions in the order
  uniform_outside = filtering.uniform_outside(opts)
  uniform = filtering.uniform_terms(e, c, coeffs.gamma, opts) if uniform_outside else None
  gamma_in_tile = coeffs.gamma if math.uniform_in_tile else jnp.zeros_like(coeffs.gamma)
  token_stats = jnp.stack([lse, coeffs.alpha, coeffs.beta, gamma_in_tile], axis=1)  # (N, 4)

  skip_bits = None
  if filter_scale is not None and residuals is not None and residuals.block_max is not None:
    if residuals.block_max.shape[1] != geo.tiles.num_vocab_blocks:
      raise AssertionError(  # the tile choice must not depend on N (block_sizes.resolve)
        f"block maxima of {residuals.block_max.shape[1]} vocabulary blocks for "
        f"{geo.tiles.num_vocab_blocks} blocks in the backward"
      )
    tokens, classes = tilings(geo)
    skip = filtering.skip_table(
      residuals.block_max,
      lse,
      filter_scale,
      local_labels,
      order,
      tokens,
      classes,
      opts.filter_eps,
      block_max_token_axis=0,
    )
    skip_bits = pack_skip_table(skip, geo)

  d_e, d_c, d_bias = kernels.grads(
    e,
    c_run,
    bias_run,
    token_stats,
    tile_labels,
    skip_bits,
    opts.filter_e_grad,
    opts.filter_c_grad,
    uniform.weighted_e if uniform_outside else None,  # (D,)
    geo,
    math,
    opts.interpret,
    group_order=groups,
  )
  if order is not None:
    positions = filtering.positions(order)  # (V,) the inverse permutation
    if groups is None:  # read by groups, dC was written back to c's own rows
      d_c = jnp.take(d_c, positions, axis=opts.vocab_dim)
    d_bias = None if d_bias is None else d_bias[positions]
  if uniform_outside:
    # The uniform smoothing term, exactly (docs/math.md).
    d_e = d_e - coeffs.gamma[:, None] * uniform.class_sum[None, :]
    if d_bias is not None:
      d_bias = d_bias - uniform.gamma_sum
  return LocalGrads(d_e=d_e, d_c=d_c, d_bias=d_bias)


def skip_table(
  inputs: TiledInputs,
  filter_scale: Callable[[jax.Array], jax.Array],  # (N,) lse -> (N,) filter scale
  opts: LossOptions,
) -> jax.Array:
  """(token blocks, vocab blocks) bool: the tiles a backward of ``inputs`` skips
  (``cce_jax.tiled.SkipTableFn``); runs the forward kernel."""
  check_inputs(inputs.e, inputs.c, opts)
  geo = geometry(inputs.e, inputs.c, opts)
  tokens, classes = tilings(geo)
  if not opts.filters_anything:
    return jnp.zeros((tokens.count, classes.count), bool)
  fwd = forward(inputs, opts, for_backward=True)
  return filtering.skip_table(
    fwd.residuals.block_max,
    fwd.lse,
    filter_scale(fwd.lse),
    inputs.local_labels,
    fwd.residuals.order,
    tokens,
    classes,
    opts.filter_eps,
    block_max_token_axis=0,
  )


resolve_block_sizes = resolve_block_sizes_of(TPUBlockSizes, TPUBlockSizes.get_default)
