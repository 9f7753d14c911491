"""The three Pallas kernels of ``impl="pallas_gpu"`` (Triton lowering) and their calls.

* :func:`forward_kernel`, grid (token blocks, vocabulary splits): an online log-sum-exp in f32
  over the vocabulary blocks of one split, the logits of each tile accumulated over chunks of D
  in registers (never written to memory); per split it writes the running max and sum, the
  logit sum (label smoothing), and per vocabulary block the row maxima the backward's skip
  test reads; split 0 also takes each token's target logit by an indexed dot.
* :func:`grad_e_kernel`, grid (token blocks,): for one block of tokens, every vocabulary block
  in the visiting order: recompute the logits, form the softmax gradient, add
  ``G @ C`` into the block's own rows of the f32 dE (chunks of D, read-modify-write).
* :func:`grad_c_kernel`: for one block of classes, every token block: recompute, add
  ``G^T @ E`` into the block's f32 accumulator, and ``sum_n G`` into the bias gradient. With an
  f32 dC, grid (vocabulary blocks,) and the accumulator is the block's own rows of dC (gathered
  by class id). With a 16-bit dC, grid (persistent programs,): each program takes one class
  block after another and accumulates it in its own (class block, D) f32 buffer, then writes
  the block's rows of dC once, cast; the f32 scratch is bounded by the programs, not by V.

Each output row is written by exactly one program, so the backward is deterministic and needs
no atomics (``benchmarks/RESULTS.md`` explains the choice). A skipped tile is a
``pl.when`` / ``lax.cond`` branch that loads and multiplies nothing.

Indexing follows :class:`cce_jax.filtering.AxisTiling`: token blocks are masked at the end,
class and hidden blocks overlap at the end so that every load of ``c`` is in bounds. Element
offsets are computed by the lowering, in 64-bit arithmetic for arrays of more than 2**32 bytes
(checked by ``tests/test_pallas_gpu.py`` on the lowered Triton IR).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cce_jax import filtering, loss_math, vma
from cce_jax.filtering import AxisTiling
from cce_jax.options import LossOptions
from pallas_kernels import stats_tile
from pallas_kernels.gpu import tile_math


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Everything static about one kernel launch.

  Attributes:
    opts: the loss options (softcap, smoothing, layout, interpret, block sizes).
    tokens, classes, hidden: the tilings of N, V and D.
    gathered: classes are visited in a permuted order (``order_ref``), rows gathered by id.
    has_bias: a bias is given.
    skip: the backward kernel reads the skip table (its product may be filtered).
    product_dtype: operand dtype of the backward's products.
    blocks_per_split: vocabulary blocks per forward program.
    want_logit_sum: the forward accumulates ``sum_v z_nv``.
    want_block_max: the forward writes per-block row maxima.
    want_token_stats: the forward also keeps, per split, ``t = sum exp(z - max) (z - max)``
      and the argmax (``cce_jax.token_stats``; :mod:`pallas_kernels.stats_tile`).
    skip_group: class blocks per column of the skip table (the dC kernel's blocks are
      ``skip_group`` times smaller than the forward's, and nest in them).
    grad_c_programs: the dC kernel runs this many persistent programs, each accumulating one
      class block after another in its own f32 buffer and writing dC in its dtype; None: one
      program per class block, accumulating in dC itself (f32).
  """

  opts: LossOptions
  tokens: AxisTiling  # "mask"
  classes: AxisTiling  # "overlap"
  hidden: AxisTiling  # "overlap"
  gathered: bool
  has_bias: bool
  skip: bool = False
  product_dtype: str = "float32"
  blocks_per_split: int = 1
  want_logit_sum: bool = False
  want_block_max: bool = False
  want_token_stats: bool = False
  skip_group: int = 1
  grad_c_programs: int | None = None


# ---- ref access ---------------------------------------------------------------------------


class ClassBlock(NamedTuple):
  """Block ``j`` of the visiting order: its start, class ids and fresh entries."""

  start: jax.Array  # () int32: first position in the order
  ids: jax.Array  # (bv,) int32: class ids (positions themselves when not gathered)
  fresh: jax.Array | None  # (bv,) bool, None when every entry is fresh


def class_block(j: jax.Array, order_ref, cfg: KernelConfig) -> ClassBlock:
  bv = cfg.classes.block
  start = cfg.classes.start(j)
  # The class ids: gathered from the order, or the positions themselves.
  ids = order_ref[pl.ds(start, bv)] if cfg.gathered else start + lax.iota(jnp.int32, bv)
  return ClassBlock(start, ids, cfg.classes.live(j, start))


def _class_index(blk: ClassBlock, cfg: KernelConfig):
  """The class index of a block: gathered ids or a contiguous slice."""
  return blk.ids if cfg.gathered else pl.ds(blk.start, cfg.classes.block)


def load_classifier(c_ref, blk: ClassBlock, d0: jax.Array, cfg: KernelConfig) -> jax.Array:
  """A chunk of the block's classifier rows: (bv, bd) for "vd", (bd, bv) for "dv"."""
  return c_ref[class_chunk_index(blk, d0, cfg)[0]]


def load_token_rows(
  ref, n0: jax.Array, rows_ok: jax.Array | None, d0: jax.Array, cfg: KernelConfig
) -> jax.Array:
  """(bn, bd) rows of an (N, D) ref, zero past N."""
  index = (pl.ds(n0, cfg.tokens.block), pl.ds(d0, cfg.hidden.block))
  if rows_ok is None:
    return ref[index]
  return plgpu.load(ref.at[index], mask=rows_ok[:, None], other=0)


def store_token_rows(
  ref,
  n0: jax.Array,
  rows_ok: jax.Array | None,
  d0: jax.Array,
  value: jax.Array,
  cfg: KernelConfig,
  fresh_d: jax.Array | None = None,
) -> None:
  """Stores (bn, bd) rows of an (N, D) ref: rows inside N, columns in ``fresh_d``."""
  index = (pl.ds(n0, cfg.tokens.block), pl.ds(d0, cfg.hidden.block))
  mask = tile_math.and_masks(
    None if rows_ok is None else rows_ok[:, None], None if fresh_d is None else fresh_d[None, :]
  )
  plgpu.store(ref.at[index], value, mask=mask)


def barrier(cfg: KernelConfig) -> None:
  """Orders one program's global-memory writes before its later reads by other threads.

  An accumulator row is initialised, then read, updated and written once per tile; Triton may
  map an element to different threads (warps) in the load and in the store, and warps do not
  run in step. A block-wide barrier (``__syncthreads``, which also makes global writes visible
  within the block) after the initialisation and after each tile orders every write before
  the next read of the same element. (Within a tile the D chunks touch disjoint columns.)
  Interpret mode runs a program sequentially and has no such primitive.
  """
  if not cfg.opts.interpret:
    plgpu.debug_barrier()


def load_token_vector(
  ref, n0: jax.Array, rows_ok: jax.Array | None, cfg: KernelConfig, other=0
) -> jax.Array:
  """(bn,) entries of an (N,) ref, ``other`` past N."""
  index = pl.ds(n0, cfg.tokens.block)
  if rows_ok is None:
    return ref[index]
  return plgpu.load(ref.at[index], mask=rows_ok, other=other)


def store_token_vector(
  ref,
  row: jax.Array | int,
  n0: jax.Array,
  rows_ok: jax.Array | None,
  value: jax.Array,
  cfg: KernelConfig,
) -> None:
  """Stores (bn,) values into row ``row`` of an (R, N) ref."""
  plgpu.store(ref.at[row, pl.ds(n0, cfg.tokens.block)], value, mask=rows_ok)


def class_chunk_index(blk: ClassBlock, d0: jax.Array, cfg: KernelConfig):
  """Index and fresh mask of a (bv, bd) ("vd") or (bd, bv) ("dv") chunk of ``c`` or dC.

  Gathered classes are indexed by two broadcast integer arrays: the one form that the Triton
  lowering accepts in both layouts (it rejects a slice before an integer array) and whose
  masked store interpret mode supports.
  """
  bv, bd = cfg.classes.block, cfg.hidden.block
  vd = cfg.opts.vocab_dim == 0
  shape = (bv, bd) if vd else (bd, bv)
  mask = None
  if blk.fresh is not None:
    mask = jnp.broadcast_to(blk.fresh[:, None] if vd else blk.fresh[None, :], shape)
  if not cfg.gathered:
    classes, hidden = pl.ds(blk.start, bv), pl.ds(d0, bd)
    return ((classes, hidden) if vd else (hidden, classes)), mask
  hidden_ids = d0 + lax.iota(jnp.int32, bd)
  if vd:
    index = (
      jnp.broadcast_to(blk.ids[:, None], shape),
      jnp.broadcast_to(hidden_ids[None, :], shape),
    )
  else:
    index = (
      jnp.broadcast_to(hidden_ids[:, None], shape),
      jnp.broadcast_to(blk.ids[None, :], shape),
    )
  return index, mask


# ---- the logits of a tile ---------------------------------------------------------------


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  dims = (((contract[0],), (contract[1],)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def tile_logits(
  e_ref,
  c_ref,
  bias_ref,
  n0: jax.Array,
  rows_ok: jax.Array | None,
  blk: ClassBlock,
  cfg: KernelConfig,
) -> jax.Array:
  """``z = softcap(e . c + b)`` of one tile, (bn, bv) f32, D reduced in chunks."""
  bn, bv = cfg.tokens.block, cfg.classes.block

  def hidden_step(k, acc):
    d0 = cfg.hidden.start(k)
    e_chunk = load_token_rows(e_ref, n0, rows_ok, d0, cfg)  # (bn, bd)
    fresh_d = cfg.hidden.live(k, d0)
    if fresh_d is not None:  # columns the previous chunk covered count once
      e_chunk = jnp.where(fresh_d[None, :], e_chunk, 0)
    c_chunk = load_classifier(c_ref, blk, d0, cfg)  # (bv, bd) or (bd, bv)
    return acc + _dot(e_chunk, c_chunk, (1, 1 - cfg.opts.vocab_dim))

  x = lax.fori_loop(0, cfg.hidden.count, hidden_step, jnp.zeros((bn, bv), jnp.float32))
  if cfg.has_bias:
    x = x + bias_ref[_class_index(blk, cfg)].astype(jnp.float32)[None, :]
  return loss_math.apply_softcap(x, cfg.opts.softcap)


# ---- forward ------------------------------------------------------------------------------


def forward_kernel(
  e_ref,
  c_ref,
  labels_ref,
  bias_ref,
  order_ref,
  max_ref,
  sum_ref,
  logit_sum_ref,
  target_ref,
  block_max_ref,
  t_ref,
  argmax_ref,
  *,
  cfg: KernelConfig,
):
  """One (token block, vocabulary split) program of the forward.

  Refs: e (N, D); c (V, D) or (D, V); labels (N,) int32 local labels (-1: none); bias (V,) or
  a dummy; order (V,) int32 or a dummy. Outputs, f32: max and sum (S, N) (the split's running
  max and sum of ``exp(z - max)``), logit_sum (S, N) or a dummy, target (N,) (written by split
  0), block_max (vocabulary blocks, N) or a dummy; with ``cfg.want_token_stats`` t (S, N) f32
  (the split's ``sum exp(z - max) (z - max)``) and argmax (S, N) int32 (the lowest class id
  holding the split's max), else dummies.
  """
  i, split = pl.program_id(0), pl.program_id(1)
  n0, rows_ok = tile_math.masked_rows(i, cfg.tokens)
  bn = cfg.tokens.block
  first = split * cfg.blocks_per_split
  last = jnp.minimum(first + cfg.blocks_per_split, cfg.classes.count)

  def vocab_step(j, carry):
    running_max, running_sum, logit_sum, *stats = carry  # stats: [t, argmax] when wanted
    blk = class_block(j, order_ref, cfg)
    z = tile_logits(e_ref, c_ref, bias_ref, n0, rows_ok, blk, cfg)  # (bn, bv)
    live = None if blk.fresh is None else blk.fresh[None, :]
    if cfg.want_token_stats:
      z_live = z if live is None else jnp.where(live, z, -jnp.inf)
      old_max = running_max
      t, argmax = stats
      running_max, running_sum, t, tile_max = stats_tile.online_step(
        running_max, running_sum, t, z_live, keepdims=False
      )
      tile_arg = stats_tile.tile_argmax(z_live, tile_max, blk.ids[None, :], keepdims=False)
      stats = [t, stats_tile.pick_argmax(old_max, argmax, tile_max, tile_arg)]
    else:
      running_max, running_sum, tile_max = filtering.online_lse_step(
        running_max, running_sum, z, live
      )
    if cfg.want_logit_sum:
      logit_sum = logit_sum + jnp.sum(z if live is None else jnp.where(live, z, 0.0), axis=1)
    if cfg.want_block_max:
      store_token_vector(block_max_ref, j, n0, rows_ok, tile_max, cfg)
    return running_max, running_sum, logit_sum, *stats

  zeros = jnp.zeros((bn,), jnp.float32)
  init = (jnp.full((bn,), -jnp.inf, jnp.float32), zeros, zeros)
  if cfg.want_token_stats:
    init = (*init, zeros, jnp.zeros((bn,), jnp.int32))
  running_max, running_sum, logit_sum, *stats = lax.fori_loop(first, last, vocab_step, init)
  store_token_vector(max_ref, split, n0, rows_ok, running_max, cfg)
  store_token_vector(sum_ref, split, n0, rows_ok, running_sum, cfg)
  if cfg.want_logit_sum:
    store_token_vector(logit_sum_ref, split, n0, rows_ok, logit_sum, cfg)
  if cfg.want_token_stats:
    store_token_vector(t_ref, split, n0, rows_ok, stats[0], cfg)
    store_token_vector(argmax_ref, split, n0, rows_ok, stats[1], cfg)

  @pl.when(split == 0)
  def _target():
    labels = load_token_vector(labels_ref, n0, rows_ok, cfg, other=-1)
    safe = jnp.maximum(labels, 0)  # (bn,) valid class ids

    def hidden_step(k, acc):
      d0 = cfg.hidden.start(k)
      e_chunk = load_token_rows(e_ref, n0, rows_ok, d0, cfg).astype(jnp.float32)
      # (bn, bd): an indexed gather of the target rows.
      if cfg.opts.vocab_dim == 0:
        rows = c_ref[safe, pl.ds(d0, cfg.hidden.block)]
      else:
        hidden_ids = d0 + lax.iota(jnp.int32, cfg.hidden.block)
        shape = (cfg.hidden.block, bn)
        rows = c_ref[
          jnp.broadcast_to(hidden_ids[:, None], shape), jnp.broadcast_to(safe[None, :], shape)
        ].T
      product = e_chunk * rows.astype(jnp.float32)
      fresh_d = cfg.hidden.live(k, d0)
      if fresh_d is not None:
        product = jnp.where(fresh_d[None, :], product, 0.0)
      return acc + jnp.sum(product, axis=1)

    x = lax.fori_loop(0, cfg.hidden.count, hidden_step, zeros)
    if cfg.has_bias:
      x = x + bias_ref[safe].astype(jnp.float32)
    target = jnp.where(labels >= 0, loss_math.apply_softcap(x, cfg.opts.softcap), 0.0)
    plgpu.store(target_ref.at[pl.ds(n0, bn)], target, mask=rows_ok)


class ForwardOutputs(NamedTuple):
  """The forward kernel's outputs (S: vocabulary splits)."""

  max_SN: jax.Array  # (S, N) f32
  sum_SN: jax.Array  # (S, N) f32
  logit_sum_SN: jax.Array  # (S, N) f32 or a (1, 1) dummy
  target: jax.Array  # (N,) f32
  block_max: jax.Array  # (vocab blocks, N) f32 or a (1, 1) dummy
  t_SN: jax.Array  # (S, N) f32 or a (1, 1) dummy
  argmax_SN: jax.Array  # (S, N) int32 or a (1, 1) dummy


def _compiler_params(cfg: KernelConfig) -> plgpu.CompilerParams:
  # Explicit Triton params: without them pallas_call on GPU lowers through Mosaic GPU.
  sizes = cfg.opts.block_sizes
  return plgpu.CompilerParams(num_warps=sizes.num_warps, num_stages=sizes.num_stages)


def _dummy(dtype=jnp.float32) -> jax.Array:
  return jnp.zeros((1,), dtype)


def _launch(
  kernel,
  cfg: KernelConfig,
  grid: tuple[int, ...],
  name: str,
  debug: bool,
  out_shapes: tuple[tuple[tuple[int, ...], jnp.dtype], ...],
  *inputs: jax.Array,
):
  """``pl.pallas_call`` on the Triton lowering (or its interpreter) over whole-array refs.

  Inside ``shard_map`` with ``check_vma``, the inputs (dummies included) are cast to vary
  alike and the outputs are declared to vary like them.
  """
  inputs = vma.vary_like(inputs, *inputs)
  call = pl.pallas_call(
    functools.partial(kernel, cfg=cfg),
    out_shape=tuple(vma.shape_dtype_struct(shape, dtype, *inputs) for shape, dtype in out_shapes),
    grid=grid,
    interpret=cfg.opts.interpret,
    compiler_params=_compiler_params(cfg),
    debug=debug,
    name=name,
  )
  return call(*inputs)


def forward_call(
  e, c, labels, bias, order, cfg: KernelConfig, splits: int, debug: bool = False
) -> ForwardOutputs:
  """Runs :func:`forward_kernel` over the (token blocks, ``splits``) grid."""
  num_tokens, f32 = cfg.tokens.size, jnp.float32
  out_shapes = ForwardOutputs(
    max_SN=((splits, num_tokens), f32),
    sum_SN=((splits, num_tokens), f32),
    logit_sum_SN=((splits, num_tokens) if cfg.want_logit_sum else (1, 1), f32),
    target=((num_tokens,), f32),
    block_max=((cfg.classes.count, num_tokens) if cfg.want_block_max else (1, 1), f32),
    t_SN=((splits, num_tokens) if cfg.want_token_stats else (1, 1), f32),
    argmax_SN=((splits, num_tokens) if cfg.want_token_stats else (1, 1), jnp.int32),
  )
  outs = _launch(
    forward_kernel,
    cfg,
    (cfg.tokens.count, splits),
    "cce_forward",
    debug,
    tuple(out_shapes),
    e,
    c,
    labels,
    _dummy() if bias is None else bias,
    _dummy(jnp.int32) if order is None else order,
  )
  return ForwardOutputs(*outs)


# ---- backward -----------------------------------------------------------------------------


class TokenRows(NamedTuple):
  """Per-token inputs of the backward for one token block, each (bn,)."""

  labels: jax.Array  # int32, -1 past N
  lse: jax.Array  # f32
  alpha: jax.Array
  beta: jax.Array
  gamma: jax.Array


def load_token_rows_of(
  labels_ref, lse_ref, alpha_ref, beta_ref, gamma_ref, n0, rows_ok, cfg: KernelConfig
) -> TokenRows:
  vec = lambda ref: load_token_vector(ref, n0, rows_ok, cfg)
  return TokenRows(
    load_token_vector(labels_ref, n0, rows_ok, cfg, other=-1),
    vec(lse_ref),
    vec(alpha_ref),
    vec(beta_ref),
    vec(gamma_ref),
  )


def tile_grad(
  e_ref, c_ref, bias_ref, rows: TokenRows, n0, rows_ok, blk: ClassBlock, cfg: KernelConfig
) -> jax.Array:
  """The recomputed softmax gradient w.r.t. the raw logits of one tile, (bn, bv) f32, zero
  on rows past N and on classes an earlier block covers."""
  z = tile_logits(e_ref, c_ref, bias_ref, n0, rows_ok, blk, cfg)
  valid = tile_math.and_masks(
    None if rows_ok is None else rows_ok[:, None],
    None if blk.fresh is None else blk.fresh[None, :],
  )
  is_target = rows.labels[:, None] == blk.ids[None, :]
  return tile_math.softmax_grad(
    z, rows.lse, is_target, rows.alpha, rows.beta, rows.gamma, valid, cfg.opts
  )


def grad_e_kernel(
  e_ref,
  c_ref,
  labels_ref,
  bias_ref,
  order_ref,
  lse_ref,
  alpha_ref,
  beta_ref,
  gamma_ref,
  class_sum_ref,
  skip_ref,
  d_e_ref,
  *,
  cfg: KernelConfig,
):
  """One token block of dE = sum_v dx_nv c_v, (N, D) f32, accumulated in its own rows.

  Refs as :func:`forward_kernel`, plus lse, alpha, beta, gamma (N,) f32 (``cce_jax.tiled``'s
  coefficients), class_sum (D,) f32 (``sum_v c_v``, for the uniform smoothing term added
  outside the tiles, or a dummy), skip (token blocks, vocabulary blocks) int32 or a dummy.
  """
  i = pl.program_id(0)
  n0, rows_ok = tile_math.masked_rows(i, cfg.tokens)
  rows = load_token_rows_of(labels_ref, lse_ref, alpha_ref, beta_ref, gamma_ref, n0, rows_ok, cfg)
  bn, bd = cfg.tokens.block, cfg.hidden.block
  p_dtype = jnp.dtype(cfg.product_dtype)

  def init_step(k, carry):
    d0 = cfg.hidden.start(k)
    if filtering.uniform_outside(cfg.opts):
      init = -rows.gamma[:, None] * class_sum_ref[pl.ds(d0, bd)][None, :]
    else:
      init = jnp.zeros((bn, bd), jnp.float32)
    store_token_rows(d_e_ref, n0, rows_ok, d0, init, cfg)
    return carry

  lax.fori_loop(0, cfg.hidden.count, init_step, 0)
  barrier(cfg)

  def tile_work(j):
    blk = class_block(j, order_ref, cfg)
    dx = tile_grad(e_ref, c_ref, bias_ref, rows, n0, rows_ok, blk, cfg).astype(p_dtype)

    def product_step(k, carry):
      d0 = cfg.hidden.start(k)
      c_chunk = load_classifier(c_ref, blk, d0, cfg).astype(p_dtype)
      update = _dot(dx, c_chunk, (1, cfg.opts.vocab_dim))  # (bn, bd)
      acc = load_token_rows(d_e_ref, n0, rows_ok, d0, cfg)
      # The last chunk writes only its fresh columns: its overlap with the previous chunk
      # holds that chunk's result, possibly read before it was stored.
      store_token_rows(d_e_ref, n0, rows_ok, d0, acc + update, cfg, cfg.hidden.live(k, d0))
      return carry

    lax.fori_loop(0, cfg.hidden.count, product_step, 0)
    barrier(cfg)  # the next tile reads these rows again

  def vocab_step(j, carry):
    if cfg.skip:
      pl.when(skip_ref[i, j] == 0)(lambda: tile_work(j))
    else:
      tile_work(j)
    return carry

  lax.fori_loop(0, cfg.classes.count, vocab_step, 0)


def grad_c_kernel(
  e_ref,
  c_ref,
  labels_ref,
  bias_ref,
  order_ref,
  lse_ref,
  alpha_ref,
  beta_ref,
  gamma_ref,
  weighted_e_ref,
  gamma_sum_ref,
  skip_ref,
  d_c_ref,
  d_bias_ref,
  buffer_ref,
  *,
  cfg: KernelConfig,
):
  """dC = sum_n dx_nv e_n (layout of c) and db = sum_n dx_nv, one class block at a time.

  Refs as :func:`grad_e_kernel`, with weighted_e (D,) f32 (``sum_n gamma_n e_n``) and
  gamma_sum (1,) f32 for the uniform smoothing term, or dummies. Outputs: d_c in the layout of
  c, d_bias (V,) f32 or a dummy, and buffer: with ``cfg.grad_c_programs`` the programs' f32
  accumulators (programs, class block, D), otherwise a dummy.

  Without ``cfg.grad_c_programs`` (f32 dC) program ``j`` owns class block ``j`` and accumulates
  in its rows of dC. With it (16-bit dC) program ``p`` owns blocks ``p``, ``p + programs``, ...
  and accumulates each in ``buffer[p]`` over every token block before writing it once, cast, to
  dC: f32 scratch bounded by the programs, not by V. Either way a block writes only its fresh
  classes, so the overlapping last block never touches its predecessor's rows.
  """
  refs = (e_ref, c_ref, labels_ref, bias_ref, order_ref, lse_ref, alpha_ref, beta_ref, gamma_ref)
  refs += (weighted_e_ref, gamma_sum_ref, skip_ref, d_c_ref, d_bias_ref, buffer_ref)
  programs = cfg.grad_c_programs
  if programs is None:
    _grad_c_block(pl.program_id(0), None, *refs, cfg=cfg)
    return
  slot = pl.program_id(0)

  def round_step(r, carry):
    j = slot + r * programs
    pl.when(j < cfg.classes.count)(lambda: _grad_c_block(j, slot, *refs, cfg=cfg))
    return carry

  lax.fori_loop(0, filtering.cdiv(cfg.classes.count, programs), round_step, 0)


def _grad_c_block(
  j: jax.Array,
  slot: jax.Array | None,
  e_ref,
  c_ref,
  labels_ref,
  bias_ref,
  order_ref,
  lse_ref,
  alpha_ref,
  beta_ref,
  gamma_ref,
  weighted_e_ref,
  gamma_sum_ref,
  skip_ref,
  d_c_ref,
  d_bias_ref,
  buffer_ref,
  *,
  cfg: KernelConfig,
) -> None:
  """Class block ``j`` of :func:`grad_c_kernel`: accumulated in dC's own rows (``slot`` None)
  or in ``buffer[slot]`` (bv, D) f32 and then written to dC in its dtype."""
  blk = class_block(j, order_ref, cfg)
  bv, bd = cfg.classes.block, cfg.hidden.block
  vd = cfg.opts.vocab_dim == 0
  buffered = slot is not None
  acc_vd = buffered or vd  # the buffer is (bv, D) whatever the layout of c
  p_dtype = jnp.dtype(cfg.product_dtype)
  outside = filtering.uniform_outside(cfg.opts)

  def accumulator(d0):
    """The (ref, index, store mask) of the accumulator's chunk at hidden offset ``d0``."""
    if buffered:
      return buffer_ref, (slot, pl.ds(0, bv), pl.ds(d0, bd)), None
    index, mask = class_chunk_index(blk, d0, cfg)
    return d_c_ref, index, mask

  def init_step(k, carry):
    d0 = cfg.hidden.start(k)
    ref, index, mask = accumulator(d0)
    shape = (bv, bd) if acc_vd else (bd, bv)
    if outside:
      w = weighted_e_ref[pl.ds(d0, bd)]
      init = jnp.broadcast_to(-(w[None, :] if acc_vd else w[:, None]), shape)
    else:
      init = jnp.zeros(shape, jnp.float32)
    plgpu.store(ref.at[index], init, mask=mask)
    return carry

  lax.fori_loop(0, cfg.hidden.count, init_step, 0)
  barrier(cfg)

  def tile_work(i, d_bias):
    n0, rows_ok = tile_math.masked_rows(i, cfg.tokens)
    rows = load_token_rows_of(labels_ref, lse_ref, alpha_ref, beta_ref, gamma_ref, n0, rows_ok, cfg)
    dx = tile_grad(e_ref, c_ref, bias_ref, rows, n0, rows_ok, blk, cfg)  # (bn, bv) f32
    d_bias = d_bias + jnp.sum(dx, axis=0)
    dx = dx.astype(p_dtype)

    def product_step(k, carry):
      d0 = cfg.hidden.start(k)
      e_chunk = load_token_rows(e_ref, n0, rows_ok, d0, cfg).astype(p_dtype)  # (bn, bd)
      # (bv, bd) into a buffer or a "vd" dC, (bd, bv) into a "dv" dC.
      update = _dot(dx, e_chunk, (0, 0)) if acc_vd else _dot(e_chunk, dx, (0, 0))
      ref, index, mask = accumulator(d0)
      fresh_d = cfg.hidden.live(k, d0)  # as in grad_e_kernel
      if fresh_d is not None:
        mask = tile_math.and_masks(mask, fresh_d[None, :] if acc_vd else fresh_d[:, None])
      plgpu.store(ref.at[index], ref[index] + update, mask=mask)
      return carry

    lax.fori_loop(0, cfg.hidden.count, product_step, 0)
    barrier(cfg)  # the next tile reads these rows again
    return d_bias

  def token_step(i, d_bias):
    if cfg.skip:
      skipped = skip_ref[i, j // cfg.skip_group] != 0
      return lax.cond(skipped, lambda i, d_bias: d_bias, tile_work, i, d_bias)
    return tile_work(i, d_bias)

  d_bias = jnp.zeros((bv,), jnp.float32)
  if outside:
    d_bias = d_bias - gamma_sum_ref[0]
  d_bias = lax.fori_loop(0, cfg.tokens.count, token_step, d_bias)
  if cfg.has_bias:
    plgpu.store(d_bias_ref.at[_class_index(blk, cfg)], d_bias, mask=blk.fresh)
  if not buffered:
    return

  def write_step(k, carry):
    d0 = cfg.hidden.start(k)
    chunk = buffer_ref[slot, pl.ds(0, bv), pl.ds(d0, bd)].astype(d_c_ref.dtype)  # (bv, bd)
    index, mask = class_chunk_index(blk, d0, cfg)
    plgpu.store(d_c_ref.at[index], chunk if vd else chunk.T, mask=mask)
    return carry

  lax.fori_loop(0, cfg.hidden.count, write_step, 0)
  barrier(cfg)  # the next class block overwrites the buffer


def grad_e_call(
  e, c, labels, bias, order, lse, coeffs, class_sum, skip, cfg: KernelConfig, debug: bool = False
) -> jax.Array:
  """Runs :func:`grad_e_kernel` over the token blocks; returns dE (N, D) f32."""
  out_shapes = (((cfg.tokens.size, cfg.hidden.size), jnp.float32),)
  (d_e,) = _launch(
    grad_e_kernel,
    cfg,
    (cfg.tokens.count,),
    "cce_grad_e",
    debug,
    out_shapes,
    e,
    c,
    labels,
    _dummy() if bias is None else bias,
    _dummy(jnp.int32) if order is None else order,
    lse,
    coeffs.alpha,
    coeffs.beta,
    coeffs.gamma,
    _dummy() if class_sum is None else class_sum,
    jnp.zeros((1, 1), jnp.int32) if skip is None else skip,
  )
  return d_e


def grad_c_call(
  e,
  c,
  labels,
  bias,
  order,
  lse,
  coeffs,
  weighted_e,
  gamma_sum,
  skip,
  cfg: KernelConfig,
  debug: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Runs :func:`grad_c_kernel`: one program per class block, or ``cfg.grad_c_programs``
  persistent ones. Returns (dC in the layout of c, f32, or the dtype of c with
  ``cfg.grad_c_programs``; d_bias (V,) f32, or a dummy without bias)."""
  programs = cfg.grad_c_programs
  f32 = jnp.float32
  out_shapes = (
    (c.shape, f32 if programs is None else c.dtype),
    ((cfg.classes.size,) if cfg.has_bias else (1,), f32),
    ((1, 1, 1) if programs is None else (programs, cfg.classes.block, cfg.hidden.size), f32),
  )
  d_c, d_bias, _ = _launch(
    grad_c_kernel,
    cfg,
    (cfg.classes.count if programs is None else programs,),
    "cce_grad_c",
    debug,
    out_shapes,
    e,
    c,
    labels,
    _dummy() if bias is None else bias,
    _dummy(jnp.int32) if order is None else order,
    lse,
    coeffs.alpha,
    coeffs.beta,
    coeffs.gamma,
    _dummy() if weighted_e is None else weighted_e,
    _dummy() if gamma_sum is None else gamma_sum,
    jnp.zeros((1, 1), jnp.int32) if skip is None else skip,
  )
  return d_c, d_bias
