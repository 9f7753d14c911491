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
from cce_jax.local_stats import entropy_from_sums
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


# ---- reading c by groups of rows ------------------------------------------------------------

GROUP_ROWS = 16
"""Rows of ``c`` (V, D) per DMA of the grouped vocabulary sort: one (16, 128) HBM tile of
bfloat16 rows (two (8, 128) tiles of float32), the smallest row count Mosaic lets a DMA start at
and move (``docs/tpu_backend.md``)."""


def _group_copies(order_ref, block, geo: Geometry, hbm, vmem, sem, *, to_hbm: bool, wait: bool):
  """Starts (or waits for) the DMAs of vocabulary block ``block``'s groups of ``c``'s rows.

  Position ``p`` of the block holds group ``order_ref[block * bv / G + p]``: rows
  ``[G g, G g + G)`` of the (V, D) array ``hbm`` (``c``, or dC when ``to_hbm``), rows
  ``[G p, G p + G)`` of the VMEM buffer ``vmem`` (``vmem`` is a callable: row slice -> ref view;
  its columns past D are not touched). Positions past the last group copy nothing. Every copy
  signals ``sem``; a wait takes one group's bytes, so each started copy is waited for once.
  """
  per_block = geo.tiles.vocab_block // GROUP_ROWS
  num_groups = geo.num_classes // GROUP_ROWS

  def body(p, carry):
    position = block * per_block + p

    @pl.when(position < num_groups)
    def _():
      group = order_ref[position]
      hbm_rows = hbm.at[pl.ds(pl.multiple_of(group * GROUP_ROWS, GROUP_ROWS), GROUP_ROWS)]
      vmem_rows = vmem(pl.ds(pl.multiple_of(p * GROUP_ROWS, GROUP_ROWS), GROUP_ROWS))
      src, dst = (vmem_rows, hbm_rows) if to_hbm else (hbm_rows, vmem_rows)
      copy = pltpu.make_async_copy(src, dst, sem)
      if wait:
        copy.wait()
      else:
        copy.start()

    return carry

  lax.fori_loop(0, per_block, body, 0)


def _vmem_rows(buffer, hidden: int, slot=None):
  """``rows -> buffer[(slot,) rows, :hidden]``: a row slice of a (maybe slotted) VMEM buffer,
  the whole buffer width when it is ``hidden``."""
  width = buffer.shape[-1]
  cols = () if width == hidden else (pl.ds(0, hidden),)
  lead = () if slot is None else (slot,)
  return lambda rows: buffer.at[(*lead, rows, *cols)]


def _full_width(geo: Geometry) -> int:
  """Columns of a whole-width VMEM block of ``e`` or ``c``: D, or D rounded up to whole hidden
  chunks when there are several (the chunks are sliced from it)."""
  t = geo.tiles
  return geo.hidden if t.num_hidden_blocks == 1 else t.num_hidden_blocks * t.hidden_block


def _padded_groups(c: jax.Array, group_order: jax.Array, geo: Geometry) -> jax.Array:
  """``group_order`` (V / GROUP_ROWS,) zero-padded to whole vocabulary blocks of ``geo`` (the
  kernels copy no padding).

  Raises:
    ValueError: ``c`` cannot be read by groups (``grouped_reads_supported``), or
      ``group_order`` is not (V / GROUP_ROWS,).
  """
  t = geo.tiles
  groups = geo.num_classes // GROUP_ROWS
  if not grouped_reads_supported(geo) or group_order.shape != (groups,):
    raise ValueError(
      f"`group_order` of shape {group_order.shape} for c of shape {c.shape}: reading c by "
      f"groups of {GROUP_ROWS} rows needs a (V, D) c with V a multiple of {GROUP_ROWS}, a "
      f"vocabulary block a multiple of {GROUP_ROWS}, D a multiple of {LANES} when it is cut "
      f"into chunks, and ({groups},) group ids."
    )
  positions = t.num_vocab_blocks * t.vocab_block // GROUP_ROWS
  return jnp.pad(group_order.astype(jnp.int32), (0, positions - groups))


def grouped_reads_supported(geo: Geometry) -> bool:
  """Whether the kernels can read ``c`` by groups of ``GROUP_ROWS`` rows at these tiles: a
  (V, D) layout, V and the vocabulary block multiples of ``GROUP_ROWS``, and D a whole number
  of lanes when the forward or the backward cuts it into chunks (a DMA moves whole rows into
  the first D columns of a chunk-padded buffer)."""
  t = geo.tiles
  chunked = t.num_hidden_blocks > 1 or t.num_forward_hidden_blocks > 1
  return (
    geo.vocab_dim == 0
    and geo.num_classes % GROUP_ROWS == 0
    and t.vocab_block % GROUP_ROWS == 0
    and (not chunked or geo.hidden % LANES == 0)
  )


# ---- forward --------------------------------------------------------------------------------


def _forward_kernel(
  *refs,
  geo: Geometry,
  math: Math,
  with_logit_sum: bool,
  with_block_max: bool,
  grouped: bool,
  with_token_stats: bool = False,
):
  """One grid step (i, j, k) of :func:`forward_stats` (and :func:`forward_token_stats`).

  refs: [group order (SMEM, scalar-prefetched) when ``grouped``], e block (bn, bd), c block
  (bv, bd) or (bd, bv) (``grouped``: the whole (V, D) array in HBM), [bias (1, bv) f32], stats
  out (bn, 128) f32, [block max out (bn, 128) f32], [logit accumulator (bn, bv) f32 when
  nk > 1], running max, running sum, logit sum scratch (bn, 1) f32 each, [with token stats:
  running ``t`` and argmax scratch (bn, 1) f32 each], and when ``grouped``: c's rows
  (2, bv, nk * bd) in c's dtype (two slots) and their DMA semaphores (2,).

  ``grouped``: vocabulary block j's groups of rows are DMA'd into slot ``j % 2`` while block
  ``j - 1`` computes (block 0 of each token block loads without overlap), whole width, at
  k = 0; hidden chunk k is sliced from the slot.
  """
  refs = list(refs)
  order_ref = refs.pop(0) if grouped else None
  e_ref, c_ref = refs.pop(0), refs.pop(0)
  bias_ref = refs.pop(0) if math.with_bias else None
  stats_ref = refs.pop(0)
  block_max_ref = refs.pop(0) if with_block_max else None
  tiles = geo.tiles
  nk, nv = tiles.num_hidden_blocks, tiles.num_vocab_blocks
  acc_ref = refs.pop(0) if nk > 1 else None
  max_ref, sum_ref, logit_sum_ref = refs[:3]
  t_ref, argmax_ref = refs[3:5] if with_token_stats else (None, None)
  j, k = pl.program_id(1), pl.program_id(2)

  if grouped:
    c_rows, sems = refs[-2:]
    slot = lax.rem(j, 2)

    def copies(block, block_slot, wait):
      rows = _vmem_rows(c_rows, geo.hidden, block_slot)
      sem = sems.at[block_slot]
      _group_copies(order_ref, block, geo, c_ref, rows, sem, to_hbm=False, wait=wait)

    @pl.when(k == 0)
    def _():
      pl.when(j == 0)(lambda: copies(j, slot, wait=False))
      copies(j, slot, wait=True)
      pl.when(j + 1 < nv)(lambda: copies(j + 1, 1 - slot, wait=False))

    c_blk = c_rows[slot] if nk == 1 else c_rows[slot, :, _chunk(k, tiles)]
  else:
    c_blk = c_ref[...]
  part = _logits_part(e_ref[...], c_blk, k, geo, math.precision)  # (bn, bv) f32
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
        entropy = entropy_from_sums(sum_ref[...], t_ref[...])
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
  group_order: jax.Array | None = None,  # (V / GROUP_ROWS,) int32
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """lse (N,) f32, logit sum (N,) f32 or None, and block maxima (N, forward vocabulary blocks)
  f32 or None.

  ``block_max[n, j] = max over the classes v of vocabulary block j of z_nv``. Runs with the
  forward's hidden chunk (``Tiles.forward_hidden_block``).

  ``group_order`` (a (V, D) ``c`` with V a multiple of ``GROUP_ROWS``): the classes are visited
  in groups of ``GROUP_ROWS`` rows, position p of the visit holding the rows of group
  ``group_order[p]`` (entries past V / GROUP_ROWS are not read); the kernel DMAs them from
  ``c`` in HBM, so no sorted copy of ``c`` is made. ``bias`` is then in the visiting order.
  """
  outs = _forward_call(
    e, c, bias, geo, math, with_logit_sum, with_block_max, False, interpret, group_order
  )
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
  group_order: jax.Array | None = None,  # (V / GROUP_ROWS,) int32
) -> list[jax.Array]:
  """The forward ``pallas_call``: [stats (N, 128) f32, block maxima (N, 128 k) f32 when
  ``with_block_max``]; ``group_order`` as in :func:`forward_stats`."""
  geo = geo._replace(tiles=geo.tiles.for_forward())
  t = geo.tiles
  nv = t.num_vocab_blocks
  grouped = group_order is not None
  grid = (t.num_token_blocks, nv, t.num_hidden_blocks)
  if grouped:
    group_order = _padded_groups(c, group_order, geo)
    c_spec = pl.BlockSpec(memory_space=pl.ANY)
  else:
    c_spec = _c_block_spec(geo, lambda i, j, k: (j, k))
  in_specs = [pl.BlockSpec((t.token_block, t.hidden_block), lambda i, j, k, *_: (i, k)), c_spec]
  args = [e, c]
  if math.with_bias:
    in_specs.append(pl.BlockSpec((1, t.vocab_block), lambda i, j, k, *_: (0, j)))
    args.append(bias.astype(jnp.float32).reshape(1, -1))
  out_shape = [jax.ShapeDtypeStruct((geo.num_tokens, LANES), jnp.float32)]
  out_specs = [pl.BlockSpec((t.token_block, LANES), lambda i, j, k, *_: (i, 0))]
  if with_block_max:
    block_max_cols = cdiv(nv, LANES) * LANES
    out_shape.append(jax.ShapeDtypeStruct((geo.num_tokens, block_max_cols), jnp.float32))
    out_specs.append(
      pl.BlockSpec((t.token_block, LANES), lambda i, j, k, *_: (i, lax.div(j, LANES)))
    )
  scratch = [pltpu.VMEM((t.token_block, t.vocab_block), jnp.float32)] * (t.num_hidden_blocks > 1)
  scratch += [pltpu.VMEM((t.token_block, 1), jnp.float32)] * (3 + 2 * with_token_stats)
  if grouped:
    scratch += [
      pltpu.VMEM((2, t.vocab_block, _full_width(geo)), c.dtype),
      pltpu.SemaphoreType.DMA((2,)),
    ]
  kernel = functools.partial(
    _forward_kernel,
    geo=geo,
    math=math,
    with_logit_sum=with_logit_sum,
    with_block_max=with_block_max,
    grouped=grouped,
    with_token_stats=with_token_stats,
  )
  itemsize = e.dtype.itemsize
  n, v, d = geo.num_tokens, geo.num_classes, geo.hidden
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=int(grouped),
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    scratch_shapes=scratch,
  )
  outs = pl.pallas_call(
    kernel,
    grid_spec=grid_spec,
    out_shape=out_shape,
    compiler_params=_compiler_params(geo, ("parallel", "arbitrary", "arbitrary")),
    cost_estimate=pl.CostEstimate(
      flops=2 * n * v * d,
      transcendentals=n * v,
      bytes_accessed=itemsize * (v * d * t.num_token_blocks + n * d),
    ),
    interpret=interpret_params(interpret),
    name="cce_token_stats" if with_token_stats else "cce_forward",
  )(*([group_order] if grouped else []), *args)
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
  *refs,
  geo: Geometry,
  math: Math,
  filter_e: bool,
  filter_c: bool,
  with_offset: bool,
  grouped: bool,
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

  ``grouped``: a group order (SMEM) follows ``skip_ref``; ``c`` and dC are the whole (V, D)
  arrays in HBM; the last scratch buffers are c's rows (bv, nk * bd) in c's dtype and two DMA
  semaphores (load, store). Block j's groups are DMA'd into the buffer at its first step
  (one buffer: the copy stalls once per vocabulary block), and at its last step dC goes
  through the same buffer back to the groups' rows.
  Steps: with one hidden chunk, one step per tile; else steps ``k < nk`` accumulate the logits
  over the chunks of D, step ``nk - 1`` forms the softmax gradient, and step ``nk + q`` does
  both products for hidden chunk q. The dE chunk of the tile is a read-modify-write of HBM by
  DMA (written without reading at j = 0); dC accumulates in VMEM and is written at the last
  token block.
  """
  refs = list(refs)
  order_ref = refs.pop(0) if grouped else None
  e_ref, c_ref = refs.pop(0), refs.pop(0)
  if grouped:
    c_hbm, c_ref, group_sems = c_ref, refs.pop(-2), refs.pop(-1)
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

  if grouped:

    def copies(to_hbm, wait):
      hbm = d_c_out if to_hbm else c_hbm
      rows = _vmem_rows(c_ref, geo.hidden)
      sem = group_sems.at[int(to_hbm)]
      _group_copies(order_ref, j, geo, hbm, rows, sem, to_hbm=to_hbm, wait=wait)

    @pl.when((i == 0) & (k == 0))
    def _():
      copies(to_hbm=False, wait=False)
      copies(to_hbm=False, wait=True)

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

  if grouped:
    # dC of the block, through c's buffer (no longer read) to its groups' rows in HBM.
    @pl.when((i == nt - 1) & (k == pl.num_programs(2) - 1))
    def _():
      block = d_c_ref[...]
      if offset_ref is not None:
        block = block - offset_ref[...]
      c_ref[...] = block.astype(c_ref.dtype)
      copies(to_hbm=True, wait=False)
      copies(to_hbm=True, wait=True)
      if d_bias_out is not None:
        d_bias_out[...] = d_bias_ref[...]

    return

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
  group_order: jax.Array | None = None,  # (V / GROUP_ROWS,) int32
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

  ``group_order`` (see :func:`forward_stats`): ``c`` is read by groups of ``GROUP_ROWS`` rows
  in that order, by DMA, and dC is written back by DMA to the same rows, so dC comes out in
  the original order with no sorted copy of either; ``bias``, ``labels`` and dbias are in the
  visiting order.
  """
  t = geo.tiles
  grouped = group_order is not None
  if grouped:
    group_order = _padded_groups(c, group_order, geo)
  nk, phases = t.num_hidden_blocks, _backward_phase_count(geo)
  nt, nv = t.num_token_blocks, t.num_vocab_blocks
  hidden_padded = nk * t.hidden_block
  c_width = geo.hidden if nk == 1 else hidden_padded  # e and c blocks are full width
  in_specs = [pl.BlockSpec((t.token_block, c_width), lambda j, i, k, *_: (i, 0))]
  # The block of c changes once per vocabulary block: one buffer (its copy stalls the grid
  # once per vocabulary block, for 1 / (token blocks) of the time) instead of two.
  single = pl.Buffered(1)
  if geo.vocab_dim == 0:
    c_spec = pl.BlockSpec((t.vocab_block, c_width), lambda j, i, k, *_: (j, 0), single)
  else:
    c_spec = pl.BlockSpec((c_width, t.vocab_block), lambda j, i, k, *_: (0, j), single)
  in_specs.append(pl.BlockSpec(memory_space=pl.ANY) if grouped else c_spec)
  if math.with_bias:
    in_specs.append(pl.BlockSpec((1, t.vocab_block), lambda j, i, k, *_: (0, j)))
  in_specs += _token_specs(t, lambda j, i, k, *_: i)
  if nk == 1:
    chunk_index = lambda j, i, k, *_: 0
  else:
    chunk_index = lambda j, i, k, *_: jnp.where(i == nt - 1, jnp.maximum(k - nk, 0), 0)
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
    if grouped:  # subtracted from the whole block at once
      offset = jnp.pad(class_offset.astype(jnp.float32), (0, c_width - geo.hidden))
      in_specs.append(pl.BlockSpec((1, c_width), lambda *ids: (0, 0)))
      args.append(offset.reshape(1, -1))
    elif vocab_major:
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
    pl.BlockSpec(memory_space=pl.ANY)
    if grouped
    else _c_block_spec(geo, lambda *ids: (ids[0], chunk_index(*ids))),
  ]
  acc_shape = (t.vocab_block, hidden_padded) if vocab_major else (hidden_padded, t.vocab_block)
  scratch = [pltpu.VMEM(acc_shape, jnp.float32)]
  if math.with_bias:
    out_shape.append(jax.ShapeDtypeStruct((1, geo.num_classes), jnp.float32))
    out_specs.append(pl.BlockSpec((1, t.vocab_block), lambda j, i, k, *_: (0, j)))
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
  if grouped:
    scratch += [pltpu.VMEM((t.vocab_block, c_width), c.dtype), pltpu.SemaphoreType.DMA((2,))]
  kernel = functools.partial(
    _grads_kernel,
    geo=geo,
    math=math,
    filter_e=filtering and filter_e,
    filter_c=filtering and filter_c,
    with_offset=class_offset is not None,
    grouped=grouped,
  )
  if grouped:
    args.insert(1, group_order)
  n, v, d = geo.num_tokens, geo.num_classes, geo.hidden
  itemsize = e.dtype.itemsize
  e_reads = nv * n * d  # e streams through once per vocabulary block
  d_e_bytes = 4 * n * d * (2 * nv - 1)  # read and written per vocabulary block, not read at j = 0
  outs = pl.pallas_call(
    kernel,
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1 + int(grouped),
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
