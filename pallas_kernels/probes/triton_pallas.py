"""Route "Pallas on Triton": the toy forward on the lowering our kernels use today.

``pl.pallas_call`` with ``jax.experimental.pallas.triton.CompilerParams``: the whole (small)
arrays are the kernel's refs; the token block is loaded once, every vocabulary tile of ``c`` is
loaded by ``pl.ds`` and multiplied with ``jnp.dot`` (f32 accumulation), and the online
log-sum-exp runs in registers. It lowers for CUDA on a CPU host (an abstract GPU device from
JAX 0.11) and runs in Pallas' HLO interpret mode (``interpret=True``). From JAX 0.11 every
lowering warns that this backend is deprecated.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.probes import common, cuda_lowering

ROUTE = "triton_pallas"
# What JAX >= 0.11 warns at every lowering through Pallas' Triton backend.
DEPRECATION_MESSAGE = "The Pallas Triton backend is deprecated"


def tile_lse(e: jax.Array, c: jax.Array, *, interpret: bool = False) -> jax.Array:
  """(TOKENS,) f32 log-sum-exp of ``e @ c.T`` for e (TOKENS, HIDDEN), c (CLASSES, HIDDEN)."""
  tokens = e.shape[0]
  classes = c.shape[0]
  block = common.VOCAB_BLOCK

  def kernel(e_ref, c_ref, lse_ref):
    e_block = e_ref[...]  # (tokens, hidden)

    def vocab_tile(j, carry):
      row_max, row_sum = carry  # (tokens,) f32 each
      c_tile = c_ref[pl.ds(j * block, block), :]  # (block, hidden)
      logits = jnp.dot(e_block, c_tile.T, preferred_element_type=jnp.float32)
      new_max = jnp.maximum(row_max, logits.max(axis=1))
      row_sum = row_sum * jnp.exp(row_max - new_max) + jnp.exp(logits - new_max[:, None]).sum(
        axis=1
      )
      return new_max, row_sum

    init = (jnp.full((tokens,), -jnp.inf, jnp.float32), jnp.zeros((tokens,), jnp.float32))
    row_max, row_sum = lax.fori_loop(0, classes // block, vocab_tile, init)
    lse_ref[...] = row_max + jnp.log(row_sum)

  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((tokens,), jnp.float32),
    compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
    interpret=interpret,
  )(e, c)


def probe_lowering(generation: str = "h100") -> common.ProbeResult:
  """Lowers :func:`tile_lse` for CUDA on this host, targeting a GPU of ``generation``; the
  result's detail says whether JAX warned that the backend is deprecated."""
  check = f"lower for CUDA ({generation})"
  # The deprecation warning is recorded (it is part of the evidence), not shown.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      exported = cuda_lowering.export_for_cuda(
        tile_lse, common.example_shapes(), generation=generation
      )
    except Exception as error:
      return common.ProbeResult(ROUTE, check, "failed", common.first_line(error))
  calls = common.custom_calls(exported.mlir_module())
  deprecated = any(str(w.message).startswith(DEPRECATION_MESSAGE) for w in caught)
  status = "ok" if calls == [cuda_lowering.TRITON_CALL] else "failed"
  return common.ProbeResult(
    ROUTE,
    check,
    status,
    f"custom calls {calls}" + ("; warns: deprecated backend" if deprecated else ""),
  )


def probe_interpret() -> common.ProbeResult:
  """Runs :func:`tile_lse` in Pallas' interpret mode on this host, against float64."""
  return common.check_numbers(
    ROUTE, "interpret=True on this host", lambda e, c: tile_lse(e, c, interpret=True)
  )


def probes() -> list[common.ProbeResult]:
  """Every check of this route."""
  return [probe_lowering("h100"), probe_lowering("a100"), probe_interpret()]
