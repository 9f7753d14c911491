"""The GPU-backend probes (``pallas_kernels.probes``): each route's toy forward lowers for CUDA
on this CPU host and, where the route has an interpret mode, matches the float64 reference.

These are the evidence behind docs/gpu_backend.md; a probe that stops lowering on a new JAX
fails here."""

from __future__ import annotations

import pytest
from testing import assert_rel_close

from pallas_kernels.probes import __main__ as probes_main
from pallas_kernels.probes import common, cuda_lowering, jax_triton, mosaic_gpu, triton_pallas, xla

# The Triton route's lowering warns that Pallas' Triton backend is deprecated (JAX >= 0.11);
# the probe records it (see test_triton_pallas_toy_lowers_for_cuda).
pytestmark = pytest.mark.filterwarnings(
  f"ignore:{triton_pallas.DEPRECATION_MESSAGE}:DeprecationWarning"
)


@pytest.mark.parametrize("generation", ["h100", "a100"])
def test_mosaic_gpu_toy_lowers_for_cuda(generation):
  result = mosaic_gpu.probe_lowering(generation)
  assert result.status == "ok", result
  assert result.detail == f"custom calls {[cuda_lowering.MOSAIC_GPU_CALL]}"


@pytest.mark.skipif(
  not mosaic_gpu.has_gpu_interpret_mode(), reason="Mosaic GPU interpret mode needs JAX >= 0.11"
)
def test_mosaic_gpu_toy_matches_float64_in_gpu_interpret_mode():
  e, c = common.example_inputs(seed=7)
  lse = mosaic_gpu.tile_lse(e, c, interpret=mosaic_gpu.plgpu.InterpretGPUParams())
  assert_rel_close("lse", lse, common.reference_lse(e, c), 1e-6)


def test_mosaic_gpu_interpret_probe_reports_what_this_jax_has():
  result = mosaic_gpu.probe_interpret()
  assert result.status == ("ok" if mosaic_gpu.has_gpu_interpret_mode() else "unavailable"), result


@pytest.mark.parametrize("generation", ["h100", "a100"])
def test_triton_pallas_toy_lowers_for_cuda(generation):
  result = triton_pallas.probe_lowering(generation)
  assert result.status == "ok", result
  deprecated = cuda_lowering.reads_abstract_gpu_device()  # JAX >= 0.11 warns
  assert result.detail.endswith("warns: deprecated backend") == deprecated, result


def test_triton_pallas_toy_matches_float64_in_interpret_mode():
  e, c = common.example_inputs(seed=8)
  assert_rel_close(
    "lse", triton_pallas.tile_lse(e, c, interpret=True), common.reference_lse(e, c), 1e-6
  )


def test_xla_route_lowers_without_custom_calls_and_matches_float64():
  assert xla.probe_lowering().status == "ok"
  e, c = common.example_inputs(seed=9)
  assert_rel_close("lse", xla.tile_lse(e, c), common.reference_lse(e, c), 1e-6)


def test_jax_triton_probe_without_the_package_says_unavailable():
  results = jax_triton.probes()
  if not jax_triton.is_installed():
    assert {r.status for r in results} == {"unavailable"}
    assert all("not installed" in r.detail for r in results)
  else:  # a venv with jax-triton: lowering needs jaxlib's GPU Triton support (the CUDA plugin)
    lowering = results[0]
    assert lowering.status == ("ok" if jax_triton.has_gpu_triton_support() else "unavailable")
    assert results[-1].status == "unavailable"  # no interpret mode


def test_check_numbers_reports_wrong_numbers_and_exceptions():
  e, c = common.example_inputs()
  wrong = common.check_numbers(
    "toy", "off by 1e-3", lambda e, c: common.reference_lse(e, c) * (1 + 1e-3)
  )
  assert wrong.status == "failed" and "1.0e-03" in wrong.detail

  def broken(e, c):
    raise RuntimeError("no GPU\nsecond line")

  raised = common.check_numbers("toy", "raises", broken)
  assert (raised.status, raised.detail) == ("failed", "RuntimeError: no GPU")
  assert common.reference_lse(e, c).shape == (common.TOKENS,)


def test_probe_table_and_its_command_line(capsys):
  assert probes_main.main(["--routes", "xla"]) == 0
  table = capsys.readouterr().out
  assert "| xla | lower for CUDA (h100) | ok | custom calls [] |" in table
  assert table.count("| xla |") == 2
  assert probes_main.main(["--routes", "xla,cuda"]) == 2
  assert "unknown route(s) cuda" in capsys.readouterr().err


def test_every_route_is_a_probe_module():
  for route in probes_main.ROUTES:
    module = __import__(f"pallas_kernels.probes.{route}", fromlist=["probes"])
    assert route == module.ROUTE
    assert callable(module.probes)
