"""The two Pallas TPU (Mosaic) kernels of Cut Cross-Entropy, and their ``pallas_call``s.

Every kernel walks the (token, vocabulary) plane in tiles of ``bn x bv`` logits, each the sum
over ``nk`` chunks of the hidden dimension of ``e_blk . c_blk`` (f32 accumulation on the matrix
unit), and never writes a logit tile to HBM:

* :func:`forward_stats`, grid (token blocks "parallel", vocabulary blocks "arbitrary", hidden
  chunks "arbitrary"): online log-sum-exp in VMEM scratch across the vocabulary blocks; the sum
  of the logits (label smoothing); the maximum logit of every (token, vocabulary block) (the
  residual of the backward's skip test).
* :func:`grads`, grid (vocabulary blocks, token blocks, phase), all "arbitrary": computes each
  tile's logits once and both products from them. A vocabulary block of ``c`` (whole width)
  and its f32 dC (and dbias) accumulator stay in VMEM while the token blocks stream through;
  each tile's share of dE is added to an f32 buffer in HBM by DMA (read, add, write), so dE
  accumulates over the vocabulary blocks in a fixed order: deterministic, no atomics. Its HBM
  traffic is ``8 N D`` bytes per vocabulary block, which is why the backward prefers a large
  vocabulary block and a small token block (``docs/tpu_backend.md``).

The backward reads a skip table (one bit per tile, scalar-prefetched into SMEM) and skips a
skipped tile's work with ``pl.when`` (its dE product and DMA, its dC product, and its logits
when both go). With more than one hidden chunk a backward tile takes ``2 nk`` grid steps:
``nk`` accumulate the logits, the softmax gradient goes to VMEM scratch, then step ``nk + q``
forms both products for hidden chunk q.

Tiles are laid out (tokens, classes): per-token vectors enter as (bn, k) columns, per-class
ones as (1, bv) rows. Ragged sizes: the last block of any axis may stick out of its array; what
it reads there is undefined (NaN in interpret mode), so hidden columns past D are zeroed
before every product, rows of ``e``/``c`` past N/V are zeroed before they multiply a gradient,
and logits of classes past V are masked out; writes past the end are dropped by Pallas.
No one-hot, no integer indexing of values: targets and masks come from comparing
``broadcasted_iota`` with labels and sizes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from cce_jax import filtering, loss_math
from cce_jax.filtering import cdiv
from pallas_kernels import stats_tile
from pallas_kernels.tpu.block_sizes import LANES, Tiles

# Per-token inputs of the backward kernels, the columns of one (N, 4) f32 array.
TOKEN_LSE, TOKEN_ALPHA, TOKEN_BETA, TOKEN_GAMMA = range(4)
NUM_TOKEN_COLUMNS = 4
# Columns of the forward's (N, 128) f32 statistics output (the last three with token stats).
STAT_LSE, STAT_LOGIT_SUM, STAT_ENTROPY, STAT_PEAK, STAT_ARGMAX = range(5)
# The argmax travels as an f32 lane of that output: exact for class ids below 2**24.
MAX_STATS_CLASSES = 2**24
SKIP_BITS = 32  # tiles per word of the packed skip table


class Geometry(NamedTuple):
  """Static shapes of one call: sizes, tiles and the classifier layout."""

  num_tokens: int  # N
  num_classes: int  # V
  hidden: int  # D
  vocab_dim: int  # 0: c is (V, D); 1: c is (D, V)
  tiles: Tiles

  @property
  def skip_words(self) -> int:
    """int32 words per token block of the packed skip table."""
    return cdiv(self.tiles.num_vocab_blocks, SKIP_BITS)


class Math(NamedTuple):
  """Static options of the logits and of their gradient."""

  softcap: float | None
  with_bias: bool
  uniform_in_tile: bool  # the -gamma term goes inside the tiles (softcap with smoothing)
  precision: lax.Precision | None  # HIGHEST for float32 inputs


def interpret_params(interpret: bool):
  """``interpret=`` of ``pallas_call``: TPU interpret mode (on CPU) or compiled Mosaic."""
  return pltpu.InterpretParams() if interpret else False


# ---- in-kernel helpers ----------------------------------------------------------------------


def _valid(block_index, block: int, size: int, shape: tuple[int, int], axis: int):
  """Bool mask of the entries of block ``block_index`` inside ``[0, size)`` along ``axis``;
  None when every block is whole."""
  if size % block == 0:
    return None
  return block_index * block + lax.broadcasted_iota(jnp.int32, shape, axis) < size


def _zero_outside(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


def _c_axes(vocab_dim: int) -> tuple[int, int]:
  """(vocabulary axis, hidden axis) of a classifier block."""
  return (0, 1) if vocab_dim == 0 else (1, 0)


def _logits_part(e_blk, c_blk, k, geo: Geometry, precision) -> jax.Array:
  """(bn, bv) f32: ``e_blk . c_blk`` over hidden chunk ``k`` (columns past D zeroed first:
  0 * NaN is NaN)."""
  hidden_block = geo.tiles.hidden_block
  _, d_axis = _c_axes(geo.vocab_dim)
  e_blk = _zero_outside(e_blk, _valid(k, hidden_block, geo.hidden, e_blk.shape, 1))
  c_blk = _zero_outside(c_blk, _valid(k, hidden_block, geo.hidden, c_blk.shape, d_axis))
  dims = (((1,), (d_axis,)), ((), ()))
  return lax.dot_general(
    e_blk, c_blk, dims, precision=precision, preferred_element_type=jnp.float32
  )


def _capped(x, bias_ref, math: Math) -> jax.Array:
  """Soft-capped logits (bn, bv) f32 from the raw products."""
  if math.with_bias:
    x = x + bias_ref[...]  # (1, bv) f32
  return loss_math.apply_softcap(x, math.softcap)


def _softmax_grad(z, i, j, tok_ref, label_ref, geo: Geometry, math: Math) -> jax.Array:
  """(bn, bv) f32 gradient w.r.t. the raw logits of tile (i, j), zero outside the problem.

  ``dz = alpha p - beta [v == label] (- gamma)``, ``dx = dz * softcap'(z)``
  (``cce_jax.tiled``; ``loss_math.softmax_grad_tile`` in tile form).
  """
  tiles = geo.tiles
  shape = z.shape
  lse = tok_ref[:, TOKEN_LSE : TOKEN_LSE + 1]  # (bn, 1)
  alpha = tok_ref[:, TOKEN_ALPHA : TOKEN_ALPHA + 1]
  beta = tok_ref[:, TOKEN_BETA : TOKEN_BETA + 1]
  class_ids = j * tiles.vocab_block + lax.broadcasted_iota(jnp.int32, shape, 1)
  is_target = label_ref[...] == class_ids  # (bn, bv)
  dz = alpha * jnp.exp(z - lse) - jnp.where(is_target, beta, 0.0)
  if math.uniform_in_tile:
    dz = dz - tok_ref[:, TOKEN_GAMMA : TOKEN_GAMMA + 1]
  dx = dz * loss_math.softcap_derivative(z, math.softcap)
  valid_rows = _valid(i, tiles.token_block, geo.num_tokens, shape, 0)
  valid_cols = _valid(j, tiles.vocab_block, geo.num_classes, shape, 1)
  dx = _zero_outside(dx, valid_rows)
  return _zero_outside(dx, valid_cols)


def _skipped(skip_ref, i, j, geo: Geometry) -> jax.Array:
  """Whether tile (i, j) is skipped: bit ``j % 32`` of word ``(i, j // 32)``."""
  word = skip_ref[i * geo.skip_words + lax.div(j, SKIP_BITS)]
  return (lax.shift_right_logical(word, lax.rem(j, SKIP_BITS)) & 1) == 1


def _compiler_params(geo: Geometry, semantics: tuple[str, ...]) -> pltpu.CompilerParams:
  return pltpu.CompilerParams(
    dimension_semantics=semantics, vmem_limit_bytes=geo.tiles.vmem_limit_bytes
  )


def _c_block_spec(geo: Geometry, index) -> pl.BlockSpec:
  """BlockSpec of a classifier block; ``index(grid ids) -> (vocab block, hidden chunk)``."""
  t = geo.tiles
  if geo.vocab_dim == 0:
    return pl.BlockSpec((t.vocab_block, t.hidden_block), index)
  return pl.BlockSpec((t.hidden_block, t.vocab_block), lambda *ids: index(*ids)[::-1])


# ---- forward --------------------------------------------------------------------------------


def _forward_kernel(
  e_ref,
  c_ref,
  *refs,
  geo: Geometry,
  math: Math,
  with_logit_sum: bool,
  with_block_max: bool,
  with_token_stats: bool = False,
):
  """One grid step (i, j, k) of :func:`forward_stats` (and :func:`forward_token_stats`).

  refs: [bias (1, bv) f32], stats out (bn, 128) f32, [block max out (bn, 128) f32],
  [logit accumulator (bn, bv) f32 when nk > 1], running max, running sum, logit sum scratch
  (bn, 1) f32 each, [with token stats: running ``t`` and argmax scratch (bn, 1) f32 each].
  """
  refs = list(refs)
  bias_ref = refs.pop(0) if math.with_bias else None
  stats_ref = refs.pop(0)
  block_max_ref = refs.pop(0) if with_block_max else None
  tiles = geo.tiles
  nk, nv = tiles.num_hidden_blocks, tiles.num_vocab_blocks
  acc_ref = refs.pop(0) if nk > 1 else None
  max_ref, sum_ref, logit_sum_ref = refs[:3]
  t_ref, argmax_ref = refs[3:] if with_token_stats else (None, None)
  j, k = pl.program_id(1), pl.program_id(2)

  part = _logits_part(e_ref[...], c_ref[...], k, geo, math.precision)  # (bn, bv) f32
  if nk > 1:

    @pl.when(k == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += part

  @pl.when(k == nk - 1)
  def _():
    z = _capped(acc_ref[...] if nk > 1 else part, bias_ref, math)  # (bn, bv)
    valid_cols = _valid(j, tiles.vocab_block, geo.num_classes, z.shape, 1)
    z_live = z if valid_cols is None else jnp.where(valid_cols, z, -jnp.inf)
    tile_max = jnp.max(z_live, axis=1, keepdims=True)  # (bn, 1)

    @pl.when(j == 0)
    def _():
      max_ref[...] = jnp.full_like(max_ref, -jnp.inf)
      sum_ref[...] = jnp.zeros_like(sum_ref)
      logit_sum_ref[...] = jnp.zeros_like(logit_sum_ref)
      if with_token_stats:
        t_ref[...] = jnp.zeros_like(t_ref)
        argmax_ref[...] = jnp.zeros_like(argmax_ref)

    old_max = max_ref[...]
    if with_token_stats:
      # Class ids as f32 (exact below MAX_STATS_CLASSES): an f32 min reduction.
      class_ids = (j * tiles.vocab_block + lax.broadcasted_iota(jnp.int32, z.shape, 1)).astype(
        jnp.float32
      )
      tile_arg = stats_tile.tile_argmax(z_live, tile_max, class_ids, keepdims=True)
      argmax_ref[...] = stats_tile.pick_argmax(old_max, argmax_ref[...], tile_max, tile_arg)
      new_max, new_sum, new_t, _ = stats_tile.online_step(
        old_max, sum_ref[...], t_ref[...], z_live, keepdims=True
      )
      sum_ref[...] = new_sum
      t_ref[...] = new_t
    else:
      new_max = jnp.maximum(old_max, tile_max)
      shift = filtering.exp_shift(new_max)  # 0 while every class so far is masked (-inf)
      sum_ref[...] = sum_ref[...] * jnp.exp(old_max - shift) + jnp.sum(
        jnp.exp(z_live - shift), axis=1, keepdims=True
      )
    max_ref[...] = new_max
    if with_logit_sum:
      logit_sum_ref[...] += jnp.sum(_zero_outside(z, valid_cols), axis=1, keepdims=True)
    lanes = lax.broadcasted_iota(jnp.int32, (tiles.token_block, LANES), 1)
    if with_block_max:
      # Column j % 128 of the (bn, 128) output block that holds vocabulary blocks
      # [128 * (j // 128), 128 * (j // 128 + 1)).
      block_max_ref[...] = jnp.where(lanes == lax.rem(j, LANES), tile_max, block_max_ref[...])

    @pl.when(j == nv - 1)
    def _():
      lse = max_ref[...] + jnp.log(sum_ref[...])
      stats = jnp.where(lanes == STAT_LSE, lse, 0.0)
      if with_logit_sum:
        stats = jnp.where(lanes == STAT_LOGIT_SUM, logit_sum_ref[...], stats)
      if with_token_stats:
        entropy = stats_tile.entropy(sum_ref[...], t_ref[...])
        stats = jnp.where(lanes == STAT_ENTROPY, entropy, stats)
        stats = jnp.where(lanes == STAT_PEAK, max_ref[...], stats)
        stats = jnp.where(lanes == STAT_ARGMAX, argmax_ref[...], stats)
      stats_ref[...] = stats


def forward_stats(
  e: jax.Array,  # (N, D)
  c: jax.Array,  # (V, D) or (D, V)
  bias: jax.Array | None,  # (V,)
  geo: Geometry,
  math: Math,
  with_logit_sum: bool,
  with_block_max: bool,
  interpret: bool,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """lse (N,) f32, logit sum (N,) f32 or None, and block maxima (N, vocab blocks) f32 or None.

  ``block_max[n, j] = max over the classes v of vocabulary block j of z_nv``. Runs with the
  forward's hidden chunk (``Tiles.forward_hidden_block``).
  """
  outs = _forward_call(e, c, bias, geo, math, with_logit_sum, with_block_max, False, interpret)
  stats = outs[0]
  lse = stats[:, STAT_LSE]
  logit_sum = stats[:, STAT_LOGIT_SUM] if with_logit_sum else None
  nv = geo.tiles.for_forward().num_vocab_blocks
  block_max = outs[1][:, :nv] if with_block_max else None
  return lse, logit_sum, block_max


def forward_token_stats(
  e: jax.Array,  # (N, D)
  c: jax.Array,  # (V, D) or (D, V)
  bias: jax.Array | None,  # (V,)
  geo: Geometry,
  math: Math,
  interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """lse, entropy, peak (the largest logit), each (N,) f32, and argmax (N,) int32 (the lowest
  class id holding the peak; 0 for a token without a finite logit), of ``cce_jax.token_stats``
  in one pass over the vocabulary: the forward kernel with its online entropy and argmax
  (:mod:`pallas_kernels.stats_tile`).

  Raises:
    ValueError: more than ``MAX_STATS_CLASSES`` classes (the argmax travels as f32).
  """
  if geo.num_classes > MAX_STATS_CLASSES:
    raise ValueError(
      f"impl='pallas_tpu' token statistics take at most {MAX_STATS_CLASSES} classes per "
      f"device, got V={geo.num_classes}; use impl='xla' or shard the vocabulary (vocab_axis)."
    )
  stats = _forward_call(e, c, bias, geo, math, False, False, True, interpret)[0]
  argmax = stats[:, STAT_ARGMAX].astype(jnp.int32)
  return stats[:, STAT_LSE], stats[:, STAT_ENTROPY], stats[:, STAT_PEAK], argmax


def _forward_call(
  e: jax.Array,  # (N, D)
  c: jax.Array,  # (V, D) or (D, V)
  bias: jax.Array | None,  # (V,)
  geo: Geometry,
  math: Math,
  with_logit_sum: bool,
  with_block_max: bool,
  with_token_stats: bool,
  interpret: bool,
) -> list[jax.Array]:
  """The forward ``pallas_call``: [stats (N, 128) f32, block maxima (N, 128 k) f32 when
  ``with_block_max``]."""
  geo = geo._replace(tiles=geo.tiles.for_forward())
  t = geo.tiles
  nv = t.num_vocab_blocks
  grid = (t.num_token_blocks, nv, t.num_hidden_blocks)
  in_specs = [
    pl.BlockSpec((t.token_block, t.hidden_block), lambda i, j, k: (i, k)),
    _c_block_spec(geo, lambda i, j, k: (j, k)),
  ]
  args = [e, c]
  if math.with_bias:
    in_specs.append(pl.BlockSpec((1, t.vocab_block), lambda i, j, k: (0, j)))
    args.append(bias.astype(jnp.float32).reshape(1, -1))
  out_shape = [jax.ShapeDtypeStruct((geo.num_tokens, LANES), jnp.float32)]
  out_specs = [pl.BlockSpec((t.token_block, LANES), lambda i, j, k: (i, 0))]
  if with_block_max:
    block_max_cols = cdiv(nv, LANES) * LANES
    out_shape.append(jax.ShapeDtypeStruct((geo.num_tokens, block_max_cols), jnp.float32))
    out_specs.append(pl.BlockSpec((t.token_block, LANES), lambda i, j, k: (i, lax.div(j, LANES))))
  scratch = [pltpu.VMEM((t.token_block, t.vocab_block), jnp.float32)] * (t.num_hidden_blocks > 1)
  scratch += [pltpu.VMEM((t.token_block, 1), jnp.float32)] * (3 + 2 * with_token_stats)
  kernel = functools.partial(
    _forward_kernel,
    geo=geo,
    math=math,
    with_logit_sum=with_logit_sum,
    with_block_max=with_block_max,
    with_token_stats=with_token_stats,
  )
  itemsize = e.dtype.itemsize
  n, v, d = geo.num_tokens, geo.num_classes, geo.hidden
  outs = pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    scratch_shapes=scratch,
    compiler_params=_compiler_params(geo, ("parallel", "arbitrary", "arbitrary")),
    cost_estimate=pl.CostEstimate(
      flops=2 * n * v * d,
      transcendentals=n * v,
      bytes_accessed=itemsize * (v * d * t.num_token_blocks + n * d),
    ),
    interpret=interpret_params(interpret),
    name="cce_token_stats" if with_token_stats else "cce_forward",
  )(*args)
  return list(outs)


# ---- backward -------------------------------------------------------------------------------


def _backward_phase_count(geo: Geometry) -> int:
  """Grid steps per backward tile: 1 when D is one chunk, else 2 nk (logits, then products)."""
  nk = geo.tiles.num_hidden_blocks
  return 1 if nk == 1 else 2 * nk


def _chunk(index, tiles: Tiles):
  """The ``index``-th hidden chunk of a full-width block, as a slice."""
  return pl.ds(pl.multiple_of(index * tiles.hidden_block, LANES), tiles.hidden_block)


def _c_chunk(c_ref, index, geo: Geometry) -> jax.Array:
  """Chunk ``index`` of the resident (full-width) classifier block: (bv, bd) or (bd, bv)."""
  if geo.tiles.num_hidden_blocks == 1:
    return c_ref[...]
  if geo.vocab_dim == 0:
    return c_ref[:, _chunk(index, geo.tiles)]
  return c_ref[_chunk(index, geo.tiles), :]


def _e_chunk(e_ref, index, geo: Geometry) -> jax.Array:
  """Chunk ``index`` of the full-width token block of ``e``: (bn, bd)."""
  if geo.tiles.num_hidden_blocks == 1:
    return e_ref[...]
  return e_ref[:, _chunk(index, geo.tiles)]


def _not(cond):
  """``not cond`` of a Python bool or a traced bool."""
  return (not cond) if isinstance(cond, bool) else jnp.logical_not(cond)


def _and(a, b):
  """``a and b`` of Python bools or traced bools."""
  if isinstance(a, bool):
    return b if a else False
  if isinstance(b, bool):
    return a if b else False
  return a & b


def _when(cond):
  """``pl.when`` that also takes a Python bool (runs or drops the body at trace time)."""
  if isinstance(cond, bool):
    return (lambda body: body()) if cond else (lambda body: None)
  return pl.when(cond)


def _grads_kernel(
  skip_ref,
  e_ref,
  c_ref,
  *refs,
  geo: Geometry,
  math: Math,
  filter_e: bool,
  filter_c: bool,
  with_offset: bool,
):
  """One grid step (j, i, k) of :func:`grads`: tile (token block i, vocabulary block j).

  refs: [bias (1, bv) f32], token stats (bn, 4) f32, labels (bn, 1) int32, [class offset
  (1, bd) or (bd, 1) f32], dE out (N padded, D padded) f32 in HBM, dC out (c's block, c's
  dtype), [dbias out (1, bv) f32], dC accumulator (bv, nk * bd) or (nk * bd, bv) f32, [dbias
  accumulator (1, bv) f32], dE tile buffer (bn, bd) f32, DMA semaphores (2,), write pending
  flag (1,) int32 in SMEM, and when nk > 1:
  logit accumulator (bn, bv) f32, gradient (bn, bv) in e's dtype.

  ``c_ref`` holds the whole width of vocabulary block j (resident over the token blocks),
  ``e_ref`` the whole width of token block i.
  Steps: with one hidden chunk, one step per tile; else steps ``k < nk`` accumulate the logits
  over the chunks of D, step ``nk - 1`` forms the softmax gradient, and step ``nk + q`` does
  both products for hidden chunk q. The dE chunk of the tile is a read-modify-write of HBM by
  DMA (written without reading at j = 0); dC accumulates in VMEM and is written at the last
  token block.
  """
  refs = list(refs)
  bias_ref = refs.pop(0) if math.with_bias else None
  tok_ref, label_ref = refs.pop(0), refs.pop(0)
  offset_ref = refs.pop(0) if with_offset else None
  d_e_hbm, d_c_out = refs.pop(0), refs.pop(0)
  d_bias_out = refs.pop(0) if math.with_bias else None
  d_c_ref = refs.pop(0)
  d_bias_ref = refs.pop(0) if math.with_bias else None
  d_e_buf, sems, pending_ref = refs.pop(0), refs.pop(0), refs.pop(0)
  tiles = geo.tiles
  nk, nt = tiles.num_hidden_blocks, tiles.num_token_blocks
  acc_ref, grad_ref = refs if nk > 1 else (None, None)
  j, i, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  v_axis, _ = _c_axes(geo.vocab_dim)
  vocab_major = geo.vocab_dim == 0
  dtype = e_ref.dtype
  # The hidden chunk of the products of this step (0 in the logit steps).
  q = k if nk == 1 else jnp.maximum(k - nk, 0)
  product_step = True if nk == 1 else k >= nk

  @pl.when((i == 0) & (k == 0))
  def _():
    d_c_ref[...] = jnp.zeros_like(d_c_ref)
    if d_bias_ref is not None:
      d_bias_ref[...] = jnp.zeros_like(d_bias_ref)

  skipped = _skipped(skip_ref, i, j, geo) if (filter_e or filter_c) else False
  skip_e = skipped if filter_e else False  # bool or traced bool
  skip_c = skipped if filter_c else False
  skip_both = skipped if (filter_e and filter_c) else False

  def gradient(x):
    grad = _softmax_grad(_capped(x, bias_ref, math), i, j, tok_ref, label_ref, geo, math)
    if d_bias_ref is not None:

      @_when(_not(skip_c))
      def _():
        d_bias_ref[...] += jnp.sum(grad, axis=0, keepdims=True)

    return grad.astype(dtype)

  def logits(chunk_index):
    return _logits_part(
      _e_chunk(e_ref, chunk_index, geo),
      _c_chunk(c_ref, chunk_index, geo),
      chunk_index,
      geo,
      math.precision,
    )

  if nk > 1:

    @_when(_and(_not(skip_both), k < nk))
    def _():
      @pl.when(k == 0)
      def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

      acc_ref[...] += logits(k)

    @_when(_and(_not(skip_both), k == nk - 1))
    def _():
      grad_ref[...] = gradient(acc_ref[...])

  def tile_grad():
    return gradient(logits(0)) if nk == 1 else grad_ref[...]

  def d_e_part(grad):  # (bn, bd) f32: grad . c over the block's classes, hidden chunk q
    c_blk = _c_chunk(c_ref, q, geo)
    # Rows of c past V are undefined: zero them, or 0 * NaN would reach dE.
    c_blk = _zero_outside(c_blk, _valid(j, tiles.vocab_block, geo.num_classes, c_blk.shape, v_axis))
    dims = (((1,), (v_axis,)), ((), ()))
    return lax.dot_general(
      grad, c_blk, dims, precision=math.precision, preferred_element_type=jnp.float32
    )

  def add_d_c(grad):  # dC chunk q += grad^T . e (or its transpose for (D, V))
    e_blk = _e_chunk(e_ref, q, geo)
    # Rows of e past N are undefined: zero them, or 0 * NaN would reach dC.
    e_blk = _zero_outside(e_blk, _valid(i, tiles.token_block, geo.num_tokens, e_blk.shape, 0))
    dims = (((0,), (0,)), ((), ()))
    if vocab_major:  # (bv, bd)
      part = lax.dot_general(
        grad, e_blk, dims, precision=math.precision, preferred_element_type=jnp.float32
      )
      if nk == 1:
        d_c_ref[...] += part
      else:
        d_c_ref[:, _chunk(q, tiles)] += part
    else:  # (bd, bv)
      part = lax.dot_general(
        e_blk, grad, dims, precision=math.precision, preferred_element_type=jnp.float32
      )
      if nk == 1:
        d_c_ref[...] += part
      else:
        d_c_ref[_chunk(q, tiles), :] += part

  # The tile's rows of dE chunk q in HBM (dE is padded to whole blocks).
  rows = pl.ds(pl.multiple_of(i * tiles.token_block, tiles.token_block), tiles.token_block)
  d_e_window = d_e_hbm.at[rows, _chunk(q, tiles)]
  read = pltpu.make_async_copy(d_e_window, d_e_buf, sems.at[0])
  write = pltpu.make_async_copy(d_e_buf, d_e_window, sems.at[1])

  # A write of dE is waited for only before the buffer is next filled (or at the last step),
  # so it overlaps the next tile's logits and dC product. The wait needs only the semaphore
  # and the size, which every window shares.
  @pl.when((j == 0) & (i == 0) & (k == 0))
  def _():
    pending_ref[0] = 0

  def finish_write():
    @pl.when(pending_ref[0] == 1)
    def _():
      write.wait()
      pending_ref[0] = 0

  def start_write():
    write.start()
    pending_ref[0] = 1

  @_when(_and(product_step, _not(skip_both)))
  def _():
    grad = tile_grad()

    @_when(_not(skip_c))
    def _():
      add_d_c(grad)

    @_when(_not(skip_e))
    def _():
      finish_write()

      @pl.when(j > 0)
      def _():
        read.start()

      part = d_e_part(grad)

      @pl.when(j > 0)
      def _():
        read.wait()
        d_e_buf[...] += part

      @pl.when(j == 0)
      def _():
        d_e_buf[...] = part

      start_write()

  # A tile skipped for dE still writes its zeros in the first vocabulary block.
  @_when(_and(_and(product_step, skip_e), j == 0))
  def _():
    finish_write()
    d_e_buf[...] = jnp.zeros_like(d_e_buf)
    start_write()

  last_step = (j == pl.num_programs(0) - 1) & (i == nt - 1) & (k == pl.num_programs(2) - 1)
  pl.when(last_step)(finish_write)

  @_when(_and(product_step, i == nt - 1))
  def _():
    if nk == 1:
      block = d_c_ref[...]
    elif vocab_major:
      block = d_c_ref[:, _chunk(q, tiles)]
    else:
      block = d_c_ref[_chunk(q, tiles), :]
    if offset_ref is not None:
      block = block - offset_ref[...]
    d_c_out[...] = block.astype(d_c_out.dtype)
    if d_bias_out is not None:
      d_bias_out[...] = d_bias_ref[...]


def grads(
  e: jax.Array,  # (N, D)
  c: jax.Array,  # (V, D) or (D, V)
  bias: jax.Array | None,  # (V,)
  token_stats: jax.Array,  # (N, 4) f32: lse, alpha, beta, gamma
  labels: jax.Array,  # (N,) int32 class of the tile column holding the target, or -1
  skip_bits: jax.Array | None,  # (token blocks * skip words,) int32; None: skip nothing
  filter_e: bool,  # a skipped tile skips its dE product
  filter_c: bool,  # a skipped tile skips its dC (and dbias) product
  class_offset: jax.Array | None,  # (D,) f32 subtracted from every class's gradient
  geo: Geometry,
  math: Math,
  interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """dE = sum_v dx_nv c_v ((N, D) f32), dC_v = sum_n dx_nv e_n - class_offset (layout and dtype
  of ``c``) and dbias_v = sum_n dx_nv ((V,) f32, None without bias), in one kernel that
  computes each tile's logits once.

  Grid (vocabulary blocks, token blocks, phases), every axis "arbitrary" (in order: dE is
  accumulated across the vocabulary blocks in HBM, so no two blocks may run at once; on
  two-core chips (v4, v5p) it runs on one core). A vocabulary block of ``c`` (whole width) and
  its f32 dC accumulator stay in VMEM while the token blocks stream through; each tile adds its
  (bn, D) share of dE to an f32 HBM buffer padded to whole blocks, by DMA. Deterministic: the
  order of every sum is fixed. A tile skipped on both sides (``filter_e`` and ``filter_c``)
  costs neither logits nor products.
  """
  t = geo.tiles
  nk, phases = t.num_hidden_blocks, _backward_phase_count(geo)
  nt, nv = t.num_token_blocks, t.num_vocab_blocks
  hidden_padded = nk * t.hidden_block
  c_width = geo.hidden if nk == 1 else hidden_padded  # e and c blocks are full width
  in_specs = [pl.BlockSpec((t.token_block, c_width), lambda j, i, k, s: (i, 0))]
  # The block of c changes once per vocabulary block: one buffer (its copy stalls the grid
  # once per vocabulary block, for 1 / (token blocks) of the time) instead of two.
  single = pl.Buffered(1)
  if geo.vocab_dim == 0:
    c_spec = pl.BlockSpec((t.vocab_block, c_width), lambda j, i, k, s: (j, 0), single)
  else:
    c_spec = pl.BlockSpec((c_width, t.vocab_block), lambda j, i, k, s: (0, j), single)
  in_specs.append(c_spec)
  if math.with_bias:
    in_specs.append(pl.BlockSpec((1, t.vocab_block), lambda j, i, k, s: (0, j)))
  in_specs += _token_specs(t, lambda j, i, k, s: i)
  if nk == 1:
    chunk_index = lambda j, i, k, s: 0
  else:
    chunk_index = lambda j, i, k, s: jnp.where(i == nt - 1, jnp.maximum(k - nk, 0), 0)
  vocab_major = geo.vocab_dim == 0
  filtering = skip_bits is not None and (filter_e or filter_c)
  args = _backward_args(
    e,
    c,
    bias,
    token_stats,
    labels,
    skip_bits if filtering else jnp.zeros((1,), jnp.int32),
    math,
  )
  if class_offset is not None:
    if vocab_major:
      in_specs.append(pl.BlockSpec((1, t.hidden_block), lambda *ids: (0, chunk_index(*ids))))
      args.append(class_offset.astype(jnp.float32).reshape(1, -1))
    else:
      in_specs.append(pl.BlockSpec((t.hidden_block, 1), lambda *ids: (chunk_index(*ids), 0)))
      args.append(class_offset.astype(jnp.float32).reshape(-1, 1))
  n_padded = nt * t.token_block
  out_shape = [
    jax.ShapeDtypeStruct((n_padded, hidden_padded), jnp.float32),
    jax.ShapeDtypeStruct(c.shape, c.dtype),
  ]
  out_specs = [
    pl.BlockSpec(memory_space=pl.ANY),
    _c_block_spec(geo, lambda *ids: (ids[0], chunk_index(*ids))),
  ]
  acc_shape = (t.vocab_block, hidden_padded) if vocab_major else (hidden_padded, t.vocab_block)
  scratch = [pltpu.VMEM(acc_shape, jnp.float32)]
  if math.with_bias:
    out_shape.append(jax.ShapeDtypeStruct((1, geo.num_classes), jnp.float32))
    out_specs.append(pl.BlockSpec((1, t.vocab_block), lambda j, i, k, s: (0, j)))
    scratch.append(pltpu.VMEM((1, t.vocab_block), jnp.float32))
  scratch += [
    pltpu.VMEM((t.token_block, t.hidden_block), jnp.float32),
    pltpu.SemaphoreType.DMA((2,)),  # dE read, dE write
    pltpu.SMEM((1,), jnp.int32),  # 1 while a dE write is in flight
  ]
  if nk > 1:
    scratch += [
      pltpu.VMEM((t.token_block, t.vocab_block), jnp.float32),
      pltpu.VMEM((t.token_block, t.vocab_block), e.dtype),
    ]
  kernel = functools.partial(
    _grads_kernel,
    geo=geo,
    math=math,
    filter_e=filtering and filter_e,
    filter_c=filtering and filter_c,
    with_offset=class_offset is not None,
  )
  n, v, d = geo.num_tokens, geo.num_classes, geo.hidden
  itemsize = e.dtype.itemsize
  e_reads = nv * n * d  # e streams through once per vocabulary block
  d_e_bytes = 4 * n * d * (2 * nv - 1)  # read and written per vocabulary block, not read at j = 0
  outs = pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(nv, nt, phases),
      in_specs=in_specs,
      out_specs=out_specs,
      scratch_shapes=scratch,
    ),
    out_shape=out_shape,
    compiler_params=_compiler_params(geo, ("arbitrary", "arbitrary", "arbitrary")),
    cost_estimate=pl.CostEstimate(
      flops=6 * n * v * d,
      transcendentals=n * v,
      bytes_accessed=itemsize * (e_reads + 2 * v * d) + d_e_bytes + 20 * n * nv,
    ),
    interpret=interpret_params(interpret),
    name="cce_backward",
  )(*args)
  d_e = outs[0][:n, :d]
  d_bias = outs[2].reshape(-1) if math.with_bias else None
  return d_e, outs[1], d_bias


def _token_specs(t: Tiles, token_index) -> list[pl.BlockSpec]:
  return [
    pl.BlockSpec((t.token_block, NUM_TOKEN_COLUMNS), lambda *ids: (token_index(*ids), 0)),
    pl.BlockSpec((t.token_block, 1), lambda *ids: (token_index(*ids), 0)),
  ]


def _backward_args(e, c, bias, token_stats, labels, skip_bits, math: Math):
  args = [skip_bits, e, c]
  if math.with_bias:
    args.append(bias.astype(jnp.float32).reshape(1, -1))
  return [*args, token_stats, labels.reshape(-1, 1).astype(jnp.int32)]
