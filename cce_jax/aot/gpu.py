"""Deviceless compilation for CUDA GPUs (A100, H100, H200) on a host without a GPU.

With the CUDA plugin installed (``pip install -e ".[gpu-aot]"``: ``jax-cuda12-plugin`` and
``jax-cuda12-pjrt`` of the JAX version; no CUDA runtime wheels), ``ptxas`` and libdevice at
hand, and ``JAX_PLATFORMS=cpu``, XLA:GPU compiles for GPUs described by a target config (the
``GpuTargetConfigProto`` text files in ``gpu_targets/``) instead of found on the host: the
real pipeline (HLO passes, Triton for Pallas kernels, LLVM to PTX, ``ptxas`` to a cubin), only
without autotuning, which needs a device. Nothing is run::

    devices = gpu.gpu_devices("h100", 4)
    mesh = jax.sharding.Mesh(devices, ("vocab",))
    with gpu.lowering_context(mesh):
      compiled = jax.jit(loss).lower(*abstract_args).compile()
    print(gpu.compile_report(compiled))

What the result says: the program and its Pallas kernels compile for that GPU, and the memory
XLA:GPU plans for it (``memory_analysis``); flops and bytes come from XLA's generic cost model
over the optimized HLO, which does not see inside custom calls (Pallas kernels count 0). What
it does not say: how fast anything runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import pathlib
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import jax

from cce_jax.aot import report

# GPU name (as ``train.hardware.CHIPS`` spells it) -> its target config in gpu_targets/.
GPUS: dict[str, str] = {"a100": "a100_80gb", "h100": "h100_sxm", "h200": "h200"}
_TARGETS_DIR = pathlib.Path(__file__).parent / "gpu_targets"
INSTALL_HINT = 'pip install -e ".[gpu-aot]"'
TOOLKIT_HINT = (
  "XLA:GPU needs ptxas and libdevice (CUDA toolkit) to compile deviceless: put ptxas on PATH "
  "or point XLA at a CUDA directory holding bin/ptxas and nvvm/libdevice with "
  "XLA_FLAGS=--xla_gpu_cuda_data_dir=/usr/local/cuda (the nvidia-cuda-nvcc-cu12 wheel provides "
  "both)"
)
# The custom call that a Pallas Triton kernel lowers to, and its name in the backend config.
_TRITON_CALL = re.compile(r'custom_call_target="__gpu\$xla\.gpu\.triton".*?, name = "([^"]+)"')
# One kernel launch of XLA:GPU's thunk sequence dump.
_THUNK = re.compile(
  r"kCustomKernel \[[^\]]*\] (?P<name>\S+) grid: \[(?P<grid>[\d, ]+)\] "
  r"threads: \[(?P<threads>[\d, ]+)\]\s+shared_memory: (?P<shared>\d+) bytes"
)


class GpuAotUnavailable(RuntimeError):
  """This installation cannot compile for GPUs deviceless (the message says what to install)."""


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """The numbers of a target config that the checks use.

  Attributes:
    name: the GPU ("h100").
    device_kind: what JAX's ``device.device_kind`` says ("NVIDIA H100 80GB HBM3").
    compute_capability: (major, minor), (9, 0) for Hopper.
    memory_bytes: device memory.
    shared_memory_per_block_bytes: the most shared memory one block can have (opt-in).
  """

  name: str
  device_kind: str
  compute_capability: tuple[int, int]
  memory_bytes: int
  shared_memory_per_block_bytes: int

  @property
  def arch(self) -> str:
    """The architecture XLA compiles for: "sm_80", or "sm_90a" on Hopper (its accelerated
    features, which Triton uses)."""
    major, minor = self.compute_capability
    return f"sm_{major}{minor}" + ("a" if major == 9 else "")


def _check_gpu(gpu: str) -> str:
  if gpu not in GPUS:
    raise ValueError(f"`gpu` must be one of {sorted(GPUS)}, got {gpu!r}.")
  return gpu


def target_config(gpu: str) -> str:
  """The ``GpuTargetConfigProto`` text of ``gpu`` ("a100", "h100", "h200").

  Raises:
    ValueError: an unknown ``gpu``.
  """
  return (_TARGETS_DIR / f"{GPUS[_check_gpu(gpu)]}.txtpb").read_text()


def _field(text: str, key: str) -> str:
  match = re.search(rf"^\s*{key}: (\S+)", text, re.MULTILINE)
  if match is None:
    raise ValueError(f"target config has no `{key}`")
  return match.group(1).strip('"')


def target(gpu: str) -> GpuTarget:
  """The :class:`GpuTarget` numbers of ``gpu``'s target config.

  Raises:
    ValueError: an unknown ``gpu``.
  """
  text = target_config(gpu)
  kind = re.search(r'^device_description_str: "([^"]+)"', text, re.MULTILINE).group(1)
  return GpuTarget(
    name=gpu,
    device_kind=kind,
    compute_capability=(int(_field(text, "major")), int(_field(text, "minor"))),
    memory_bytes=int(_field(text, "device_memory_size")),
    shared_memory_per_block_bytes=int(_field(text, "shared_memory_per_block_optin")),
  )


def require_plugin() -> None:
  """Raises :class:`GpuAotUnavailable` (naming the install) without the CUDA plugin."""
  try:
    found = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins namespace at all
    found = False
  if not found:
    raise GpuAotUnavailable(
      "compiling for GPUs on this host needs JAX's CUDA plugin (jax-cuda12-plugin and "
      f"jax-cuda12-pjrt of the installed JAX's version): {INSTALL_HINT}"
    )


def gpu_devices(gpu: str, count: int) -> list[jax.Device]:
  """``count`` deviceless ``gpu`` devices (one host) to build meshes and shardings on.

  Arrays cannot be placed on them; programs whose inputs are sharded over them compile with
  XLA:GPU for that GPU.

  Raises:
    ValueError: an unknown ``gpu`` or a ``count`` below 1.
    GpuAotUnavailable: the CUDA plugin is not installed.
  """
  _check_gpu(gpu)
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(f"`count` must be an int >= 1, got {count!r}.")
  require_plugin()
  from jax.experimental import topologies

  topology = topologies.get_topology_desc(
    platform="cuda", target_config=target_config(gpu), topology=f"1x1x{count}"
  )
  return list(topology.devices)


def gpu_mesh(gpu: str, axes: dict[str, int]) -> jax.sharding.Mesh:
  """A mesh of ``prod(axes.values())`` deviceless ``gpu`` devices with these axis sizes (Auto
  axis types: the compiler propagates shardings, as for the trainer's mesh)."""
  sizes = tuple(axes.values())
  devices = gpu_devices(gpu, math.prod(sizes))
  axis_types = (jax.sharding.AxisType.Auto,) * len(sizes)
  return jax.make_mesh(sizes, tuple(axes), axis_types=axis_types, devices=devices)


@contextlib.contextmanager
def lowering_context(mesh: jax.sharding.Mesh) -> Iterator[None]:
  """Context to lower (``jax.jit(f).lower``) for ``mesh``'s GPUs in: on JAX >= 0.11 a Pallas
  Triton kernel takes its target GPU from the abstract mesh in context, so ``mesh``'s abstract
  mesh is set; JAX 0.10 needs nothing (see ``pallas_kernels.probes.cuda_lowering``)."""
  from pallas_kernels.probes import cuda_lowering

  with cuda_lowering.cuda_target(mesh=mesh.abstract_mesh):
    yield


def compile_lowered(lowered: Any, dump_dir: str | pathlib.Path | None = None) -> Any:
  """``lowered.compile()`` for a GPU target, with the XLA dump in ``dump_dir`` (optional: for
  :func:`kernel_reports`).

  Raises:
    GpuAotUnavailable: ptxas or libdevice missing (the message names
      ``XLA_FLAGS=--xla_gpu_cuda_data_dir``).
  """
  options = {} if dump_dir is None else {"xla_dump_to": str(dump_dir)}
  try:
    return lowered.compile(compiler_options=options)
  except Exception as error:  # XLA raises JaxRuntimeError / XlaRuntimeError
    message = str(error)
    if re.search(r"ptxas|libdevice|cuda_data_dir", message, re.IGNORECASE):
      first = message.strip().splitlines()[0][:200] if message.strip() else ""
      raise GpuAotUnavailable(f"{TOOLKIT_HINT} (XLA said: {first})") from error
    raise


def cost_model(compiled: Any) -> dict[str, float]:
  """XLA's generic HLO cost model over ``compiled``'s optimized (per-device) HLO: a dict with
  "flops", "transcendentals" and "bytes accessed" (XLA:GPU's deviceless ``cost_analysis()``
  gives None). Custom calls (Pallas kernels) count nothing, and a while loop's body counts once,
  not per iteration. Uses JAX's internal ``hlo_module_cost_analysis`` (what
  ``Lowered.cost_analysis`` calls) with the CPU client."""
  from jax._src import xla_bridge
  from jax._src.lib import _jax

  cpu = xla_bridge.get_backend("cpu")
  totals: dict[str, float] = {"flops": 0.0, "transcendentals": 0.0, "bytes accessed": 0.0}
  for module in compiled.runtime_executable().hlo_modules():
    costs = _jax.hlo_module_cost_analysis(cpu, module)
    for key in totals:
      totals[key] += float(costs.get(key, 0.0))
  return totals


def compile_report(compiled: Any) -> report.CompileReport:
  """Per-device memory (``memory_analysis``) and the generic cost model's flops and bytes of
  a deviceless GPU compile."""
  costs = cost_model(compiled)
  return dataclasses.replace(
    report.memory_report(compiled),
    flops=costs["flops"],
    bytes_accessed=costs["bytes accessed"],
  )


@dataclasses.dataclass(frozen=True)
class KernelReport:
  """One Pallas (Triton) kernel of a compiled program, as XLA:GPU built it.

  Attributes:
    name: the kernel's name ("cce_forward").
    arch: the PTX target ("sm_90a").
    shared_memory_bytes: the dynamic shared memory of its launch.
    threads: threads per block.
    grid: the launch grid (x, y, z).
    ptx_path: the dumped PTX file holding its ``.entry`` (feed it to ``ptxas -v``).
  """

  name: str
  arch: str
  shared_memory_bytes: int
  threads: int
  grid: tuple[int, int, int]
  ptx_path: pathlib.Path


def pallas_kernel_names(compiled: Any) -> list[str]:
  """Names of the Pallas Triton kernels in ``compiled``'s optimized HLO, each once, in order."""
  return list(dict.fromkeys(_TRITON_CALL.findall(compiled.as_text())))


def kernel_reports(compiled: Any, dump_dir: str | pathlib.Path) -> list[KernelReport]:
  """The :class:`KernelReport` of every Pallas kernel of ``compiled``, from the XLA dump in
  ``dump_dir`` (of :func:`compile_lowered` with that ``dump_dir``): the thunk sequence gives
  each launch's shared memory, threads and grid, the PTX files its target.

  Raises:
    ValueError: a Pallas kernel of the HLO missing from the dump (a dump of another compile,
      or an XLA whose dump format this does not read).
  """
  dump = pathlib.Path(dump_dir)
  launches = {}
  for path in sorted(dump.glob("*thunk_sequence.txt")):
    for match in _THUNK.finditer(path.read_text()):
      launches[match["name"]] = match
  entries = {}
  for path in sorted(dump.glob("*.ptx")):
    text = path.read_text()
    arch = re.search(r"^\.target (\S+)", text, re.MULTILINE)
    for name in re.findall(r"\.entry (\w+)\(", text):
      entries[name] = (arch.group(1).rstrip(",") if arch else "?", path)
  reports = []
  for name in pallas_kernel_names(compiled):
    if name not in launches or name not in entries:
      raise ValueError(
        f"kernel {name!r} is not in the XLA dump at {dump} (thunk sequence: "
        f"{name in launches}, PTX: {name in entries})"
      )
    launch = launches[name]
    arch, ptx_path = entries[name]
    grid = tuple(int(x) for x in launch["grid"].split(","))
    reports.append(
      KernelReport(
        name=name,
        arch=arch,
        shared_memory_bytes=int(launch["shared"]),
        threads=int(launch["threads"].split(",")[0]),
        grid=grid,  # type: ignore[arg-type]
        ptx_path=ptx_path,
      )
    )
  return reports


def abstract(
  mesh: jax.sharding.Mesh, shape: Sequence[int], dtype: Any, spec: Any = None
) -> jax.ShapeDtypeStruct:
  """A ``jax.ShapeDtypeStruct`` sharded over ``mesh`` by ``spec`` (a ``PartitionSpec``;
  None: replicated)."""
  from jax.sharding import NamedSharding, PartitionSpec

  spec = PartitionSpec() if spec is None else spec
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))


def find_ptxas() -> pathlib.Path | None:
  """The ``ptxas`` XLA would use: under ``--xla_gpu_cuda_data_dir`` of ``XLA_FLAGS``, else on
  PATH; None where there is none."""
  match = re.search(r"--xla_gpu_cuda_data_dir=(\S+)", os.environ.get("XLA_FLAGS", ""))
  if match is not None and (pathlib.Path(match.group(1)) / "bin" / "ptxas").is_file():
    return pathlib.Path(match.group(1)) / "bin" / "ptxas"
  found = shutil.which("ptxas")
  return None if found is None else pathlib.Path(found)


def assemble(kernel: KernelReport, cubin_path: str | pathlib.Path) -> str:
  """Assembles ``kernel``'s dumped PTX into a cubin at ``cubin_path`` with ``ptxas -v`` for its
  architecture (what XLA:GPU does in the compile, redone where its output can be seen) and
  returns ptxas's report (registers, spills, static shared memory per entry).

  Raises:
    GpuAotUnavailable: no ptxas (see :data:`TOOLKIT_HINT`).
    RuntimeError: ptxas failed (its output in the message).
  """
  ptxas = find_ptxas()
  if ptxas is None:
    raise GpuAotUnavailable(TOOLKIT_HINT)
  command = [str(ptxas), f"-arch={kernel.arch}", "-v", str(kernel.ptx_path), "-o", str(cubin_path)]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"ptxas failed on {kernel.name} ({kernel.ptx_path}): {result.stderr}")
  return result.stdout + result.stderr
