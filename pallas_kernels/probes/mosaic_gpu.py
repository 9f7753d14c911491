"""Route "Mosaic GPU": the toy forward as a Pallas Mosaic GPU kernel (Hopper and newer).

``plgpu.kernel`` (not ``pl.pallas_call``: from JAX 0.11 a GPU ``pallas_call`` lowers through
Triton only, and Mosaic GPU kernels are written against a mesh of thread blocks) launches one
thread block of one warpgroup. It copies the token block into shared memory by TMA, then for
every vocabulary tile copies the tile of ``c`` by TMA, multiplies on the tensor cores
(``plgpu.wgmma`` with an f32 accumulator, ``c`` read transposed in place) and folds the tile
into a running maximum and sum per token, in registers laid out as the accumulator's rows
(``Layout.WGMMA.reduce(1)``). The log-sum-exp goes back through shared memory by TMA.

What the probe checks without a GPU: ``jax.export(platforms=["cuda"])`` lowers it on every
supported JAX (with an abstract H100 from 0.11), and the GPU interpret mode
(``plgpu.InterpretGPUParams``, JAX 0.11 and newer) runs it on the CPU, simulating shared
memory, TMA and barriers. Plain ``interpret=True`` cannot run it (TMA copies have no
discharge rule), and the lowering does not check the target: it lowers for an A100 too,
although ``wgmma`` needs sm_90a (the module is compiled to PTX only on the GPU).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.probes import common, cuda_lowering

ROUTE = "mosaic_gpu"


def tile_lse(e: jax.Array, c: jax.Array, *, interpret: Any = None) -> jax.Array:
  """(TOKENS,) f32 log-sum-exp of ``e @ c.T`` for e (TOKENS, HIDDEN), c (CLASSES, HIDDEN),
  both bfloat16; ``interpret``: None (compiled) or ``plgpu.InterpretGPUParams()``."""
  tokens, hidden = e.shape
  classes = c.shape[0]
  block = common.VOCAB_BLOCK
  # 128-byte swizzled (8, 64) tiles: the shared-memory layout wgmma reads bf16 operands from.
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  row_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row (token)

  def body(e_gmem, c_gmem, lse_gmem):
    def scoped(e_smem, c_smem, lse_smem, barriers):
      plgpu.copy_gmem_to_smem(e_gmem, e_smem, barriers.at[0])
      plgpu.barrier_wait(barriers.at[0])

      def vocab_tile(j, carry):
        row_max, row_sum = carry  # (tokens,) f32 each
        plgpu.copy_gmem_to_smem(c_gmem.at[pl.ds(j * block, block)], c_smem, barriers.at[1])
        plgpu.barrier_wait(barriers.at[1])

        def matmul(acc_ref):
          plgpu.wgmma(acc_ref, e_smem, c_smem.transpose((1, 0)))
          return acc_ref[...]

        logits = pl.run_scoped(matmul, plgpu.ACC((tokens, block), jnp.float32))  # (tokens, block)
        new_max = jnp.maximum(row_max, logits.max(axis=1))
        shifted = logits - lax.broadcast_in_dim(new_max, logits.shape, [0])
        row_sum = row_sum * jnp.exp(row_max - new_max) + jnp.exp(shifted).sum(axis=1)
        return new_max, row_sum

      init = (
        plgpu.layout_cast(jnp.full((tokens,), -jnp.inf, jnp.float32), row_layout),
        plgpu.layout_cast(jnp.zeros((tokens,), jnp.float32), row_layout),
      )
      row_max, row_sum = lax.fori_loop(0, classes // block, vocab_tile, init)
      lse_smem[...] = row_max + jnp.log(row_sum)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(lse_smem, lse_gmem)
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
      scoped,
      plgpu.SMEM((tokens, hidden), e.dtype, transforms=transforms),
      plgpu.SMEM((block, hidden), c.dtype, transforms=transforms),
      plgpu.SMEM((tokens,), jnp.float32),
      plgpu.Barrier(num_barriers=2),
    )

  options = {} if interpret is None else {"interpret": interpret}
  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((tokens,), jnp.float32), **options)(e, c)


def has_gpu_interpret_mode() -> bool:
  """Whether this JAX has Mosaic GPU's interpret mode (``plgpu.InterpretGPUParams``, 0.11+)."""
  return hasattr(plgpu, "InterpretGPUParams")


def probe_lowering(generation: str = "h100") -> common.ProbeResult:
  """Lowers :func:`tile_lse` for CUDA on this host, targeting a GPU of ``generation``."""
  check = f"lower for CUDA ({generation})"
  try:
    exported = cuda_lowering.export_for_cuda(
      tile_lse,
      common.example_shapes(),
      generation=generation,
      custom_calls=(cuda_lowering.MOSAIC_GPU_CALL,),
    )
  except Exception as error:
    return common.ProbeResult(ROUTE, check, "failed", common.first_line(error))
  calls = common.custom_calls(exported.mlir_module())
  status = "ok" if calls == [cuda_lowering.MOSAIC_GPU_CALL] else "failed"
  return common.ProbeResult(ROUTE, check, status, f"custom calls {calls}")


def probe_interpret() -> common.ProbeResult:
  """Runs :func:`tile_lse` in GPU interpret mode on this host, against float64."""
  check = "GPU interpret mode on this host"
  if not has_gpu_interpret_mode():
    return common.ProbeResult(
      ROUTE, check, "unavailable", f"JAX {jax.__version__} has no plgpu.InterpretGPUParams (0.11+)"
    )
  params = plgpu.InterpretGPUParams()
  return common.check_numbers(ROUTE, check, lambda e, c: tile_lse(e, c, interpret=params))


def probes() -> list[common.ProbeResult]:
  """Every check of this route."""
  return [probe_lowering("h100"), probe_lowering("a100"), probe_interpret()]
