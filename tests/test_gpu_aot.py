"""Deviceless XLA:GPU compiles on this CPU host (``cce_jax.aot.gpu``, ``benchmarks/gpu_aot.py``,
``python -m train.aot --gpu``).

Tests marked ``gpu_aot`` compile with the real XLA:GPU pipeline for A100 (sm_80) and H100
(sm_90a) and need JAX's CUDA plugin (``pip install -e ".[gpu-aot]"``), ptxas and libdevice;
they skip, naming the install, without the plugin, and run with ``JAX_PLATFORMS=cpu``:

    JAX_PLATFORMS=cpu python -m pytest -q -m gpu_aot tests/test_gpu_aot.py [--runslow]

The rest (target configs, errors, the dump parser, the RESULTS.md writer) run everywhere.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import pytest
import train_testing
from testing import require_gpu_aot

from cce_jax import checks, dispatch
from cce_jax.aot import gpu
from train import config as config_lib
from train.hardware import CHIPS, chip_of

sys.path.insert(0, str(train_testing.ROOT / "benchmarks"))
import gpu_aot

GIB = 2**30


# --- everywhere -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(gpu.GPUS))
def test_target_config_numbers(name):
  target = gpu.target(name)
  assert chip_of(target.device_kind) == name  # JAX's device_kind maps back to the chip
  # Device memory within 1% of the trainer's per-chip HBM table.
  assert abs(target.memory_bytes / GIB - CHIPS[name].hbm_gib) <= 0.01 * CHIPS[name].hbm_gib
  want_arch = {"a100": "sm_80", "h100": "sm_90a", "h200": "sm_90a"}[name]
  assert target.arch == want_arch
  # Opt-in shared memory per block: 163 KB on A100, 227 KB on Hopper (CUDA's tables).
  assert target.shared_memory_per_block_bytes == {"sm_80": 163, "sm_90a": 227}[want_arch] * 1024


def test_target_configs_ship_as_package_data():
  text = (train_testing.ROOT / "pyproject.toml").read_text()
  assert '"aot/gpu_targets/*.txtpb"' in text
  shipped = sorted(p.stem for p in (train_testing.ROOT / "cce_jax/aot/gpu_targets").glob("*"))
  assert shipped == sorted(gpu.GPUS.values())


def test_unknown_gpu_is_named():
  with pytest.raises(
    ValueError, match=r"`gpu` must be one of \['a100', 'h100', 'h200'\], got 'v100'"
  ):
    gpu.target_config("v100")
  with pytest.raises(ValueError, match="`count` must be an int >= 1, got 0"):
    gpu.gpu_devices("h100", 0)


def test_missing_plugin_names_the_install(monkeypatch):
  monkeypatch.setattr(gpu.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(gpu.GpuAotUnavailable, match=re.escape('pip install -e ".[gpu-aot]"')):
    gpu.gpu_devices("h100", 1)


class _FailingLowered:
  def __init__(self, message: str):
    self.message = message

  def compile(self, compiler_options):
    raise RuntimeError(self.message)


def test_missing_toolkit_names_the_flag():
  lowered = _FailingLowered("INTERNAL: Couldn't find a suitable version of ptxas.")
  with pytest.raises(gpu.GpuAotUnavailable, match="XLA_FLAGS=--xla_gpu_cuda_data_dir"):
    gpu.compile_lowered(lowered)
  with pytest.raises(RuntimeError, match="something else"):  # other errors pass unchanged
    gpu.compile_lowered(_FailingLowered("something else"))


class _FakeCompiled:
  def __init__(self, hlo: str):
    self.hlo = hlo

  def as_text(self) -> str:
    return self.hlo


_TRITON_HLO = (
  '%a = custom-call(), custom_call_target="__gpu$xla.gpu.triton", backend_config={debug = '
  'false, grid_x = 3 : i32, ir = "ML\\EF", name = "{name}", num_stages = 3 : i32}'
)


def test_kernel_reports_read_the_dump(tmp_path):
  (tmp_path / "m.thunk_sequence.txt").write_text(
    "001: kCustomKernel [source | next=002 (1)] loop_fusion grid: [8, 1, 1] threads: [128, 1, 1]"
    "  shared_memory: 0 bytes\n"
    "002: kCustomKernel [prev=001 (1) | sink] my_kernel grid: [17, 3, 1] threads: [256, 1, 1]"
    "  shared_memory: 98304 bytes\n"
  )
  (tmp_path / "m.7.ptx").write_text(
    ".version 8.0\n.target sm_90a\n.address_size 64\n.visible .entry my_kernel(\n)\n"
  )
  compiled = _FakeCompiled(_TRITON_HLO.replace("{name}", "my_kernel"))
  [kernel] = gpu.kernel_reports(compiled, tmp_path)
  assert (kernel.name, kernel.arch, kernel.shared_memory_bytes) == ("my_kernel", "sm_90a", 98304)
  assert (kernel.threads, kernel.grid, kernel.ptx_path.name) == (256, (17, 3, 1), "m.7.ptx")
  missing = _FakeCompiled(_TRITON_HLO.replace("{name}", "other_kernel"))
  with pytest.raises(ValueError, match="kernel 'other_kernel' is not in the XLA dump"):
    gpu.kernel_reports(missing, tmp_path)


def test_compile_platform_reads_the_abstract_mesh():
  device = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
  )
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  assert checks.compile_platform(jnp.ones(3)) is None  # no mesh: JAX's default backend
  with jax.sharding.use_abstract_mesh(mesh):
    assert checks.compile_platform() == "gpu"
  pallas_gpu = dispatch.implementation("pallas_gpu")
  checks.check_backend(pallas_gpu, "cpu", platform="gpu")  # compiled for a GPU: accepted
  with pytest.raises(ValueError, match="`impl`='pallas_gpu' compiles its kernels for the gpu"):
    checks.check_backend(pallas_gpu, "cpu", platform="cpu")
  with pytest.raises(ValueError, match="`impl`='pallas_gpu' compiles its kernels for the gpu"):
    checks.check_backend(pallas_gpu, "cpu")  # no platform known: JAX's default backend


def test_results_section_is_rewritten_in_place(tmp_path):
  results = tmp_path / "RESULTS.md"
  results.write_text("# Results\n\nbefore\n")
  row = {
    "gpu": "h100",
    "arch": "sm_90a",
    "impl": "xla",
    "mode": "loss",
    "dtype": "bf16",
    "softcap": False,
    "shape": "paper",
    "layout": "single",
    "compile_s": 2.5,
    "temp_bytes": 7.5 * 2**20,
    "flops": 6e8,
    "bytes_accessed": 1.2e9,
  }
  gpu_aot.write_section(results, gpu_aot.markdown([row], "python benchmarks/gpu_aot.py"))
  results.write_text(results.read_text() + "\nafter\n")
  failed = {**row, "error": "ValueError: no"}
  gpu_aot.write_section(results, gpu_aot.markdown([failed], "python benchmarks/gpu_aot.py"))
  text = results.read_text()
  assert text.startswith("# Results\n\nbefore\n") and text.rstrip().endswith("after")
  assert text.count(gpu_aot.BEGIN) == 1 and text.count(gpu_aot.END) == 1
  assert "failed: ValueError: no" in text and "| 7.5 |" not in text


_XLA_LOG = re.compile(r"^([IWEF]\d{4} |WARNING: All log messages before absl)")


def _train_aot(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
  return subprocess.run(
    [python, "-m", "train.aot", *args],
    cwd=train_testing.ROOT,
    env=train_testing.subprocess_env(JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=900,
  )


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (("configs/default.yaml", "--gpu"), "hardware.chip=None names no GPU with a target config"),
    (("configs/gemma2_2b.yaml", "--gpu", "v100"), "--gpu v100 names no GPU"),
    (("configs/gemma2_2b.yaml", "--gpu", "--real-devices"), "drop --real-devices"),
  ],
)
def test_train_aot_gpu_bad_values_are_one_line(args, message):
  result = _train_aot(*args)
  assert result.returncode == 2, result.stderr
  # With the CUDA plugin installed and no driver, XLA's C++ logging adds its own lines.
  ours = [line for line in result.stderr.splitlines() if not _XLA_LOG.match(line)]
  assert len(ours) == 1 and message in ours[0], result.stderr


# --- with the CUDA plugin: real XLA:GPU compiles ---------------------------------------------


def _lowered_loss(name: str, shape: str, impl: str, grad: bool, softcap: float | None):
  case = gpu_aot.Case(
    gpu=name,
    impl=impl,
    mode="loss+grad" if grad else "loss",
    dtype="bf16",
    softcap=softcap is not None,
    shape=shape,
    layout="single",
  )
  lowered, _ = gpu_aot.lower_case(case)
  return lowered


@pytest.mark.gpu_aot
@pytest.mark.parametrize("shape", ["paper", "llama3"])
@pytest.mark.parametrize("name", ["a100", "h100"])
def test_pallas_kernels_compile_to_cubins_within_shared_memory(name, shape):
  """Every Pallas kernel that impl="pallas_gpu" lowers to (loss + gradient) is built for the
  GPU's architecture, with its launch's shared memory within the GPU's per-block limit, and
  its PTX assembles to a cubin."""
  require_gpu_aot()
  target = gpu.target(name)
  softcap = 30.0 if shape == "paper" else None  # Gemma 2 softcaps; Llama 3 does not
  with tempfile.TemporaryDirectory() as dump:
    compiled = gpu.compile_lowered(_lowered_loss(name, shape, "pallas_gpu", True, softcap), dump)
    kernels = gpu.kernel_reports(compiled, dump)
    assert len(kernels) >= 2, kernels  # at least a forward and a backward kernel
    assert [k.name for k in kernels] == gpu.pallas_kernel_names(compiled)
    for kernel in kernels:
      assert kernel.arch == target.arch, kernel
      assert 0 < kernel.shared_memory_bytes <= target.shared_memory_per_block_bytes, kernel
      cubin = pathlib.Path(dump) / f"{kernel.name}.cubin"
      log = gpu.assemble(kernel, cubin)
      assert f"Compiling entry function '{kernel.name}' for '{target.arch}'" in log, log
      assert cubin.stat().st_size > 0


@pytest.mark.gpu_aot
@pytest.mark.parametrize(
  ("shape", "bound"),
  [
    ("paper", 0.01),
    # Llama 3's V (128k) is half the paper's and D (4096) 1.8 times: the f32 (N, D) gradient
    # of e (128 MiB) is 2.1% of the baseline's (N, V) logits and their gradient.
    ("llama3", 0.03),
  ],
)
def test_xla_loss_grad_temp_is_a_small_fraction_of_the_baseline(shape, bound):
  require_gpu_aot()
  temps = {}
  for impl in ("baseline", "xla"):
    compiled = gpu.compile_lowered(_lowered_loss("h100", shape, impl, True, None))
    temps[impl] = gpu.compile_report(compiled).temp_bytes
  n, _, v = gpu_aot.SHAPES[shape]
  assert temps["baseline"] >= 4 * n * v  # the f32 logits, at least once
  assert temps["xla"] < bound * temps["baseline"], temps


@pytest.mark.gpu_aot
def test_compile_report_counts_the_baseline_matmul():
  """The generic cost model's flops of the materialized loss: at least the logits' matmul
  2 N D V (XLA's own count, against the formula)."""
  require_gpu_aot()
  compiled = gpu.compile_lowered(_lowered_loss("h100", "llama3", "baseline", False, None))
  report = gpu.compile_report(compiled)
  n, d, v = gpu_aot.SHAPES["llama3"]
  assert 2 * n * d * v <= report.flops <= 1.1 * 2 * n * d * v
  assert report.bytes_accessed >= 2 * (n + v) * d  # e and c read once at least
  assert report.argument_bytes == 2 * (n + v) * d + 4 * n


def _gpu_configs() -> list[str]:
  names = []
  for path in sorted((train_testing.ROOT / "configs").glob("*.yaml")):
    if config_lib.load(str(path), []).hardware.chip in gpu.GPUS:
      names.append(path.name)
  return names


def test_there_is_a_gpu_config():
  assert _gpu_configs() == ["gemma2_2b.yaml"]


@pytest.mark.gpu_aot
@pytest.mark.slow  # about 2 minutes: the full-size train step
@pytest.mark.parametrize("name", _gpu_configs())
def test_train_aot_gpu_fits_every_gpu_config(name):
  require_gpu_aot()
  result = _train_aot(f"configs/{name}", "--gpu")
  assert result.returncode == 0, result.stdout + result.stderr
  chip = config_lib.load(str(train_testing.ROOT / "configs" / name), []).hardware.chip
  assert f"{gpu.target(chip).device_kind} devices (XLA:GPU deviceless" in result.stdout
  assert "fits: peak" in result.stdout, result.stdout
