"""Route "XLA only": no kernel; the chunked pure-JAX implementation (``impl="xla"``).

The toy is ``cce_jax.linear_cross_entropy(..., impl="xla", return_lse=True)``'s log-sum-exp,
with vocabulary blocks of ``VOCAB_BLOCK`` classes. It needs no GPU-specific lowering at all:
``jax.export(platforms=["cuda"])`` produces plain StableHLO (no custom call) on any JAX, and the
same code runs natively on the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import cce_jax
from pallas_kernels.probes import common, cuda_lowering

ROUTE = "xla"


def tile_lse(e: jax.Array, c: jax.Array) -> jax.Array:
  """(TOKENS,) f32 log-sum-exp of ``e @ c.T`` through ``impl="xla"``."""
  labels = jnp.zeros((e.shape[0],), jnp.int32)
  blocks = cce_jax.BlockSizes(token_block=e.shape[0], vocab_block=common.VOCAB_BLOCK)
  _, lse = cce_jax.linear_cross_entropy(
    e, c, labels, reduction="none", return_lse=True, impl="xla", block_sizes=blocks
  )
  return lse


def probe_lowering(generation: str = "h100") -> common.ProbeResult:
  """Lowers :func:`tile_lse` for CUDA on this host (no custom calls expected)."""
  check = f"lower for CUDA ({generation})"
  try:
    exported = cuda_lowering.export_for_cuda(
      tile_lse, common.example_shapes(), generation=generation, custom_calls=()
    )
  except Exception as error:
    return common.ProbeResult(ROUTE, check, "failed", common.first_line(error))
  calls = common.custom_calls(exported.mlir_module())
  return common.ProbeResult(ROUTE, check, "ok" if not calls else "failed", f"custom calls {calls}")


def probe_run() -> common.ProbeResult:
  """Runs :func:`tile_lse` on this host (natively: nothing to interpret), against float64."""
  return common.check_numbers(ROUTE, "runs on this host", jax.jit(tile_lse))


def probes() -> list[common.ProbeResult]:
  """Every check of this route."""
  return [probe_lowering("h100"), probe_run()]
