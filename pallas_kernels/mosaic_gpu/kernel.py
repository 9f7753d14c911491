"""The forward kernel of ``impl="pallas_mosaic_gpu"``: Pallas on Mosaic GPU (Hopper and newer).

One thread block of one warpgroup per block of 64 tokens (the last block overlaps the one
before it when N is ragged: its shared rows are recomputed identically). For each vocabulary
tile (the last one overlapping likewise, its repeated classes masked out), the logits are
accumulated on the tensor cores over chunks of 64 hidden units: both operands are copied into
shared memory by TMA (``c`` read transposed in place for the (V, D) layout), ``plgpu.wgmma``
accumulates in f32. Bias and softcap are applied to the accumulator, then the tile is folded
into a running maximum and sum per token (the accumulator's row layout), the logit sum (label
smoothing) and, for a backward that filters, the tile's maximum per token, written out per
tile. This is a first, unpipelined version: every copy is waited for before its product.

Needs: ``e`` and ``c`` float16 or bfloat16, D a multiple of 64, N >= 64 and V >= the vocabulary
block (the wrapper in :mod:`pallas_kernels.mosaic_gpu.implementation` pads the rest).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu.block_sizes import HIDDEN_CHUNK, TOKEN_ROWS

# Up to JAX 0.10, plgpu.load takes an index after the ref (0.11 deprecates it, 0.12 drops it).
_LOAD_TAKES_INDEX = jax.__version_info__ < (0, 11)


class KernelConfig(NamedTuple):
  """Static parameters of one forward kernel.

  Attributes:
    num_classes: V, the classes that count (``c`` may hold padding beyond them).
    vocab_block: classes per tile.
    vocab_dim: 0 for ``c`` of shape (V, D), 1 for (D, V).
    softcap: None or the softcap.
    with_bias: whether a (V,) f32 bias is passed after ``c``.
    want_logit_sum: write each token's sum of logits (label smoothing).
    want_block_max: write each (vocabulary block, token)'s largest logit (filtering).
  """

  num_classes: int
  vocab_block: int
  vocab_dim: int
  softcap: float | None
  with_bias: bool
  want_logit_sum: bool
  want_block_max: bool


def _load_columns(ref, layout) -> jax.Array:
  """A (block,) shared-memory ref as one value per accumulator column."""
  if _LOAD_TAKES_INDEX:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def forward_stats(
  e: jax.Array, c: jax.Array, bias: jax.Array | None, cfg: KernelConfig, interpret: Any = None
) -> tuple[jax.Array, ...]:
  """Per-token statistics of ``capped(e @ c + bias)`` over ``cfg.num_classes`` classes.

  Args:
    e: (N, D) float16/bfloat16, N >= 64, D a multiple of 64.
    c: (Vc, D) or (D, Vc) (``cfg.vocab_dim``), dtype of ``e``; Vc >= ``cfg.vocab_block``;
      classes from ``cfg.num_classes`` on are padding and never counted.
    bias: (Vc,) float32 or None (``cfg.with_bias``).
    cfg: the static configuration.
    interpret: None (compiled, on a GPU) or ``plgpu.InterpretGPUParams()``.

  Returns:
    ``lse`` (N,) f32, then ``logit_sum`` (N,) f32 if ``cfg.want_logit_sum``, then
    ``block_max`` (blocks, N) f32 if ``cfg.want_block_max``, blocks = ceil(V / vocab_block).
  """
  num_tokens, hidden = e.shape
  num_stored = c.shape[cfg.vocab_dim]
  block = cfg.vocab_block
  num_token_blocks = -(-num_tokens // TOKEN_ROWS)
  num_vocab_blocks = -(-cfg.num_classes // block)
  num_chunks = hidden // HIDDEN_CHUNK
  # 128-byte swizzled (8, 64) tiles: the shared-memory layout wgmma reads 16-bit operands from.
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  rows_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per token (accumulator row)
  tile_shape = (TOKEN_ROWS, block)
  c_tile_shape = (block, HIDDEN_CHUNK) if cfg.vocab_dim == 0 else (HIDDEN_CHUNK, block)

  def body(*refs):
    e_gmem, c_gmem, *refs = refs
    bias_gmem = refs.pop(0) if cfg.with_bias else None
    lse_gmem = refs.pop(0)
    logit_sum_gmem = refs.pop(0) if cfg.want_logit_sum else None
    block_max_gmem = refs.pop(0) if cfg.want_block_max else None
    t0 = jnp.minimum(lax.axis_index("tokens") * TOKEN_ROWS, num_tokens - TOKEN_ROWS)

    def c_chunk(v0, k):
      if cfg.vocab_dim == 0:
        return c_gmem.at[pl.ds(v0, block), pl.ds(k * HIDDEN_CHUNK, HIDDEN_CHUNK)]
      return c_gmem.at[pl.ds(k * HIDDEN_CHUNK, HIDDEN_CHUNK), pl.ds(v0, block)]

    def write_rows(row_smem, values, dst):
      """(64,) values of the row layout -> ``dst`` in global memory, through shared memory."""
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # row_smem's previous copy has left
      row_smem[...] = values
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(row_smem, dst)

    def scoped(e_smem, c_smem, bias_smem, row_smem, barriers):
      def vocab_tile(j, carry):
        row_max, row_sum, logit_sum = carry  # (64,) f32 each
        v0 = jnp.minimum(j * block, num_stored - block)

        def matmul(acc_ref):
          def hidden_chunk(k, _):
            plgpu.copy_gmem_to_smem(
              e_gmem.at[pl.ds(t0, TOKEN_ROWS), pl.ds(k * HIDDEN_CHUNK, HIDDEN_CHUNK)],
              e_smem,
              barriers.at[0],
            )
            plgpu.copy_gmem_to_smem(c_chunk(v0, k), c_smem, barriers.at[1])
            plgpu.barrier_wait(barriers.at[0])
            plgpu.barrier_wait(barriers.at[1])
            rhs = c_smem.transpose((1, 0)) if cfg.vocab_dim == 0 else c_smem
            plgpu.wgmma(acc_ref, e_smem, rhs)
            plgpu.wgmma_wait(0)  # the next chunk's copies overwrite the operands
            return _

          lax.fori_loop(0, num_chunks, hidden_chunk, None)
          return acc_ref[...]

        logits = pl.run_scoped(matmul, plgpu.ACC(tile_shape, jnp.float32))  # (64, block) f32
        if cfg.with_bias:
          plgpu.copy_gmem_to_smem(bias_gmem.at[pl.ds(v0, block)], bias_smem, barriers.at[2])
          plgpu.barrier_wait(barriers.at[2])
          tile_bias = _load_columns(bias_smem, plgpu.Layout.WGMMA.reduce(0))  # (block,)
          logits = logits + lax.broadcast_in_dim(tile_bias, tile_shape, [1])
        if cfg.softcap is not None:
          logits = cfg.softcap * jnp.tanh(logits / cfg.softcap)
        classes = v0 + plgpu.broadcasted_iota(jnp.int32, tile_shape, 1, layout=plgpu.Layout.WGMMA)
        # Classes an earlier tile covered (the overlapping last tile) or padding: not counted.
        fresh = (classes >= j * block) & (classes < cfg.num_classes)
        live = jnp.where(fresh, logits, -jnp.inf)
        tile_max = live.max(axis=1)
        new_max = jnp.maximum(row_max, tile_max)
        shifted = live - lax.broadcast_in_dim(new_max, tile_shape, [0])
        row_sum = row_sum * jnp.exp(row_max - new_max) + jnp.exp(shifted).sum(axis=1)
        if cfg.want_logit_sum:
          logit_sum = logit_sum + jnp.where(fresh, logits, 0.0).sum(axis=1)
        if cfg.want_block_max:
          write_rows(row_smem, tile_max, block_max_gmem.at[j, pl.ds(t0, TOKEN_ROWS)])
        return new_max, row_sum, logit_sum

      zeros = plgpu.layout_cast(jnp.zeros((TOKEN_ROWS,), jnp.float32), rows_layout)
      init = (
        plgpu.layout_cast(jnp.full((TOKEN_ROWS,), -jnp.inf, jnp.float32), rows_layout),
        zeros,
        zeros,
      )
      row_max, row_sum, logit_sum = lax.fori_loop(0, num_vocab_blocks, vocab_tile, init)
      write_rows(row_smem, row_max + jnp.log(row_sum), lse_gmem.at[pl.ds(t0, TOKEN_ROWS)])
      if cfg.want_logit_sum:
        write_rows(row_smem, logit_sum, logit_sum_gmem.at[pl.ds(t0, TOKEN_ROWS)])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
      scoped,
      plgpu.SMEM((TOKEN_ROWS, HIDDEN_CHUNK), e.dtype, transforms=transforms),
      plgpu.SMEM(c_tile_shape, c.dtype, transforms=transforms),
      plgpu.SMEM((block,), jnp.float32) if cfg.with_bias else None,
      plgpu.SMEM((TOKEN_ROWS,), jnp.float32),
      plgpu.Barrier(num_barriers=3),
    )

  rows = jax.ShapeDtypeStruct((num_tokens,), jnp.float32)
  out_type = [rows]
  if cfg.want_logit_sum:
    out_type.append(rows)
  if cfg.want_block_max:
    out_type.append(jax.ShapeDtypeStruct((num_vocab_blocks, num_tokens), jnp.float32))
  options = {} if interpret is None else {"interpret": interpret}
  args = (e, c, bias) if cfg.with_bias else (e, c)
  return tuple(
    plgpu.kernel(
      body, out_type=tuple(out_type), grid=(num_token_blocks,), grid_names=("tokens",), **options
    )(*args)
  )
