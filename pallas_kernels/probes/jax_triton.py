"""Route "official Triton through jax_triton": the toy forward as a ``@triton.jit`` kernel.

The kernel is plain Triton (``tl.load`` of the token block and of each vocabulary tile,
``tl.dot`` with f32 accumulation, the online log-sum-exp in registers), called from JAX with
``jax_triton.triton_call``. ``jax_triton`` compiles the kernel with Triton's own compiler while
JAX lowers the call, so the lowering needs Triton's CUDA backend and the GPU's compute
capability (given here explicitly, so that no GPU is asked for); the custom call then needs
jaxlib's GPU Triton support (``jaxlib.gpu_triton``, which comes with ``jax-cuda12-plugin``) to be
serialized. On a CPU host with ``jax-triton`` and ``jax-cuda12-plugin`` installed (no CUDA
libraries), the lowering runs Triton's whole compiler, down to the GPU binary. The packages
are optional: without ``jax-triton`` (PyPI; it needs Python >= 3.12 and JAX >= 0.11) or the
plugin, the probe reports the route unavailable.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp

from pallas_kernels.probes import common, cuda_lowering

ROUTE = "jax_triton"
CUSTOM_CALL = "triton_kernel_call_ffi"
# Compute capability per generation, passed to jax_triton (it would otherwise ask the GPU).
COMPUTE_CAPABILITY = {"h100": 90, "a100": 80}


def is_installed() -> bool:
  """Whether ``jax_triton`` and ``triton`` can be imported here."""
  return all(importlib.util.find_spec(name) is not None for name in ("jax_triton", "triton"))


def has_gpu_triton_support() -> bool:
  """Whether jaxlib can serialize a Triton kernel call here: its ``gpu_triton`` module comes
  from the CUDA plugin (``jax-cuda12-plugin``, which installs and lowers without CUDA)."""
  from jax._src.lib import gpu_triton

  return gpu_triton is not None and hasattr(gpu_triton, "TritonKernel")


@functools.cache
def _kernel():
  """The ``@triton.jit`` kernel (built on first use: ``triton`` is an optional import)."""
  import triton
  import triton.language as tl

  @triton.jit
  def lse_kernel(
    e_ptr,
    c_ptr,
    lse_ptr,
    tokens: tl.constexpr,
    hidden: tl.constexpr,
    classes: tl.constexpr,
    block: tl.constexpr,
  ):
    rows = tl.arange(0, tokens)
    cols = tl.arange(0, hidden)
    e = tl.load(e_ptr + rows[:, None] * hidden + cols[None, :])  # (tokens, hidden)
    row_max = tl.full((tokens,), float("-inf"), tl.float32)
    row_sum = tl.zeros((tokens,), tl.float32)
    for start in range(0, classes, block):
      ids = start + tl.arange(0, block)
      c = tl.load(c_ptr + ids[:, None] * hidden + cols[None, :])  # (block, hidden)
      logits = tl.dot(e, tl.trans(c))  # (tokens, block) f32
      new_max = tl.maximum(row_max, tl.max(logits, 1))
      row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
      row_max = new_max
    tl.store(lse_ptr + rows, row_max + tl.log(row_sum))

  return lse_kernel


def tile_lse(e: jax.Array, c: jax.Array, *, compute_capability: int | None = None) -> jax.Array:
  """(TOKENS,) f32 log-sum-exp of ``e @ c.T`` through ``jax_triton.triton_call``.

  Raises:
    ModuleNotFoundError: ``jax_triton`` or ``triton`` is not installed.
  """
  import jax_triton

  tokens, hidden = e.shape
  return jax_triton.triton_call(
    e,
    c,
    kernel=_kernel(),
    out_type=jax.ShapeDtypeStruct((tokens,), jnp.float32),
    grid=(1,),
    num_warps=4,
    num_stages=1,
    compute_capability=compute_capability,
    tokens=tokens,
    hidden=hidden,
    classes=c.shape[0],
    block=common.VOCAB_BLOCK,
  )


def probe_lowering(generation: str = "h100") -> common.ProbeResult:
  """Lowers :func:`tile_lse` for CUDA on this host, for a GPU of ``generation``."""
  check = f"lower for CUDA ({generation})"
  if not is_installed():
    return common.ProbeResult(ROUTE, check, "unavailable", "jax_triton / triton not installed")
  if not has_gpu_triton_support():
    return common.ProbeResult(
      ROUTE,
      check,
      "unavailable",
      "jaxlib has no GPU Triton support here: install jax-cuda12-plugin "
      "(no GPU nor CUDA needed to lower)",
    )
  run = functools.partial(tile_lse, compute_capability=COMPUTE_CAPABILITY[generation])
  try:
    exported = cuda_lowering.export_for_cuda(
      run, common.example_shapes(), generation=generation, custom_calls=(CUSTOM_CALL,)
    )
  except Exception as error:
    return common.ProbeResult(ROUTE, check, "failed", common.first_line(error))
  calls = common.custom_calls(exported.mlir_module())
  return common.ProbeResult(
    ROUTE, check, "ok" if calls == [CUSTOM_CALL] else "failed", f"custom calls {calls}"
  )


def probe_interpret() -> common.ProbeResult:
  """Tries to run :func:`tile_lse` on this host: jax_triton has no interpret mode (its call has
  no CPU lowering), so this is expected to be unavailable."""
  check = "run on this host"
  if not is_installed():
    return common.ProbeResult(ROUTE, check, "unavailable", "jax_triton / triton not installed")
  result = common.check_numbers(ROUTE, check, tile_lse)
  if result.detail.startswith("NotImplementedError"):
    return dataclasses.replace(result, status="unavailable")
  return result


def probes() -> list[common.ProbeResult]:
  """Every check of this route."""
  return [probe_lowering("h100"), probe_lowering("a100"), probe_interpret()]
