"""``cce_jax.token_stats`` with ``impl="pallas_gpu"`` / ``"pallas_tpu"`` lowered for real devices.

The numbers (interpret mode against the float64 reference) are checked in
``tests/test_token_stats.py``; here the kernels go through the lowerings interpret mode skips:
Pallas-to-Triton for CUDA and Pallas-to-Mosaic for TPU (``jax.export`` on this host), and,
where the compilers are installed, the real XLA:TPU compiler for v5e (``tpu_aot``: needs libtpu,
``pip install -e ".[tpu-aot]"``) and the real XLA:GPU compiler with ptxas for H100
(``gpu_aot``: needs JAX's CUDA plugin, ``pip install -e ".[gpu-aot]"``); those skip, naming the
install, without them:

    JAX_PLATFORMS=cpu python -m pytest -q -m "tpu_aot or gpu_aot" tests/test_token_stats_pallas.py

Sizes are not multiples of any block. With the gradient the program holds the forward kernel
only: the backward is the "xla" tiled one (``cce_jax.stats``).
"""

from __future__ import annotations

import pathlib
import re
import tempfile

import jax
import jax.numpy as jnp
import pytest
from testing import require_gpu_aot

import cce_jax
from cce_jax.aot import gpu, tpu
from pallas_kernels.probes import cuda_lowering

P = jax.sharding.PartitionSpec
_TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"
pytestmark = pytest.mark.filterwarnings(f"ignore:{_TRITON_DEPRECATION}:DeprecationWarning")
MOSAIC_CALL = "tpu_custom_call"
TOKENS, HIDDEN, CLASSES = 1000, 640, 1500  # no block of either kernel divides N or V


def _args(dtype, layout: str, with_bias: bool, sharding=None) -> list:
  s = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
  c_shape = (CLASSES, HIDDEN) if layout == "vd" else (HIDDEN, CLASSES)
  bias = s((CLASSES,), jnp.float32) if with_bias else None
  return [s((TOKENS, HIDDEN), dtype), s(c_shape, dtype), s((TOKENS,), jnp.int32), bias]


def _stats_and_grads(impl: str, layout: str, softcap: float | None):
  """(stats, d_e, d_c) of a weighted sum of lse, entropy and logprob."""

  def stats(e, c, labels, bias):
    return cce_jax.token_stats(
      e, c, labels, bias=bias, impl=impl, softcap=softcap, classifier_layout=layout
    )

  def objective(e, c, labels, bias):
    out = stats(e, c, labels, bias)
    return jnp.sum(out.lse) + 0.5 * jnp.sum(out.entropy) - jnp.sum(out.logprob), out

  def both(e, c, labels, bias):
    grads, out = jax.grad(objective, argnums=(0, 1), has_aux=True)(e, c, labels, bias)
    return out, *grads

  return both


# ---- Pallas-to-Triton and Pallas-to-Mosaic lowerings, on this host --------------------------


@pytest.mark.parametrize(
  ("dtype", "layout", "with_bias", "softcap"),
  [(jnp.bfloat16, "vd", True, 30.0), (jnp.float32, "dv", False, None)],
)
def test_pallas_gpu_token_stats_lower_for_cuda(monkeypatch, dtype, layout, with_bias, softcap):
  """One Triton kernel, the loss's forward (``cce_forward``) with its token statistics; the
  gradient adds no Pallas kernel (the "xla" tiled backward)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the up-front backend check
  fn = _stats_and_grads("pallas_gpu", layout, softcap)
  module = cuda_lowering.export_for_cuda(fn, _args(dtype, layout, with_bias)).mlir_module()
  assert module.count(f"custom_call @{cuda_lowering.TRITON_CALL}") == 1
  assert re.findall(r'name = "(cce_\w+)"', module) == ["cce_forward"]


@pytest.mark.parametrize(
  ("dtype", "layout", "with_bias", "softcap"),
  [(jnp.bfloat16, "vd", True, 30.0), (jnp.float32, "dv", False, None)],
)
def test_pallas_tpu_token_stats_lower_for_tpu(monkeypatch, dtype, layout, with_bias, softcap):
  """One Mosaic kernel (``cce_token_stats``), lowered for TPU (block shapes, layouts and the
  ops Mosaic takes are checked here, not in interpret mode)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # the up-front backend check
  fn = _stats_and_grads("pallas_tpu", layout, softcap)
  exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*_args(dtype, layout, with_bias))
  module = exported.mlir_module()
  assert module.count(MOSAIC_CALL) == 1
  assert "cce_token_stats" in module


# ---- the real compilers (tpu_aot, gpu_aot) --------------------------------------------------


@pytest.mark.tpu_aot
@pytest.mark.parametrize(
  ("dtype", "layout", "with_bias", "softcap"),
  [(jnp.bfloat16, "vd", True, 30.0), (jnp.float32, "dv", False, None)],
)
def test_pallas_tpu_token_stats_compile_for_v5e(dtype, layout, with_bias, softcap):
  """XLA:TPU (Mosaic included) compiles the statistics and their gradient for one v5e chip."""
  if not tpu.has_libtpu():
    pytest.skip(f"needs libtpu, the TPU compiler: {tpu.INSTALL_HINT}")
  mesh = jax.make_mesh((1,), ("x",), devices=tpu.tpu_devices("v5e:1x1"))
  args = _args(dtype, layout, with_bias, jax.sharding.NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    compiled = jax.jit(_stats_and_grads("pallas_tpu", layout, softcap)).lower(*args).compile()
  assert compiled.as_text().count(MOSAIC_CALL) == 1


@pytest.mark.gpu_aot
def test_pallas_gpu_token_stats_compile_to_a_cubin_for_h100():
  """XLA:GPU compiles the statistics and their gradient for an H100: the one Triton kernel is
  built for sm_90a within the shared-memory limit, and its PTX assembles to a cubin."""
  require_gpu_aot()
  target = gpu.target("h100")
  mesh = gpu.gpu_mesh("h100", {"x": 1})
  args = _args(jnp.bfloat16, "vd", True, jax.sharding.NamedSharding(mesh, P()))
  with gpu.lowering_context(mesh), jax.set_mesh(mesh):
    lowered = jax.jit(_stats_and_grads("pallas_gpu", "vd", 30.0)).lower(*args)
  with tempfile.TemporaryDirectory() as dump:
    compiled = gpu.compile_lowered(lowered, dump)
    kernels = gpu.kernel_reports(compiled, dump)
    assert len(kernels) == 1, kernels
    (kernel,) = kernels
    assert kernel.arch == target.arch, kernel
    assert 0 < kernel.shared_memory_bytes <= target.shared_memory_per_block_bytes, kernel
    cubin = pathlib.Path(dump) / f"{kernel.name}.cubin"
    log = gpu.assemble(kernel, cubin)
    assert f"Compiling entry function '{kernel.name}' for '{target.arch}'" in log, log
    assert cubin.stat().st_size > 0
