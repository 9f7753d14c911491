"""Compile a config's train step ahead of time, with abstract inputs, and check that it fits.

    python -m train.aot CONFIG.yaml [key=value ...] [--devices N | --real-devices |
                                                     --topology [TOPOLOGY]]
    python -m train.aot CONFIG.yaml --gpu [h100] [--devices N]

Lowers and compiles the jitted train step for ``jax.ShapeDtypeStruct`` inputs carrying their
shardings (nothing is allocated or run, no data is read) on ``N`` forced CPU host devices
(default: the config's ``hardware.chips``, else the devices JAX finds), and prints the
per-device memory of ``memory_analysis()``: arguments, temporaries and the peak (arguments +
outputs - donated + temporaries). A config that cannot be sharded or compiled fails here, on a
laptop, rather than on a TPU pod.

Exit status: 0 when it compiles and the peak fits ``hardware.hbm_gib`` (or the config names no
memory), 1 when the peak exceeds it, 2 for a bad config or argument (one line naming it).
``--real-devices`` compiles for the accelerators of this host (of every host of a multi-host
slice, started on all of them, per the config's ``distributed``) with their own compiler, and
also checks each device's reported memory limit. The CPU compiler's numbers estimate a TPU's or
GPU's (layouts and fusions differ); leave headroom. The vocabulary of a config without
``model.vocab_size`` is ``data.vocab_size`` rounded up to 128.

``--gpu NAME`` (a100, h100, h200; without NAME the config's ``hardware.chip``) compiles with
the real XLA:GPU compiler for ``N`` (``--devices``, else ``hardware.chips``) deviceless GPUs
of that kind on this host, no GPU needed (``pip install -e ".[gpu-aot]"``; see
``cce_jax.aot.gpu``), and checks the peak against the smaller of ``hardware.hbm_gib`` and the
GPU's memory: XLA:GPU's own numbers, without autotuning.

``--topology v5p:2x2x4`` compiles for a TPU slice that is not attached, on this CPU host, with
the real XLA:TPU compiler (libtpu: ``pip install -e ".[tpu-aot]"``; see
:mod:`cce_jax.aot.tpu`), and checks the fit with its memory numbers, which the CPU compiler's
overstate (it computes bfloat16 in float32). ``--topology`` without a value takes the slice of
the config's ``hardware`` (``chip: v5p, chips: 16`` -> ``v5p:2x2x4``); a config that names no
TPU chip needs the topology spelled out. The memory limit is ``hardware.hbm_gib`` when the
config's chip is the topology's generation, else that generation's HBM
(``train.hardware.CHIPS``). The TPU compiler's flop count of the step is printed too (loop
bodies, the scanned layers and micro-batches among them, counted once).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from train import config as config_lib

GIB = 2**30
# Exit status of a config whose step does not fit its hardware.
EXIT_DOES_NOT_FIT = 1
EXIT_BAD_CONFIG = 2
# --topology given without a value: take the slice from the config's hardware.
TOPOLOGY_FROM_CONFIG = "from-config"


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """A compiled train step and its per-device memory (bytes; None where not reported)."""

  config: config_lib.TrainConfig
  mesh_shape: dict[str, int]
  compiled: Any
  argument_bytes: int | None
  output_bytes: int | None
  alias_bytes: int | None
  temp_bytes: int | None

  @property
  def peak_bytes(self) -> int | None:
    """Arguments + outputs - donated (aliased) buffers + temporaries: the step's footprint."""
    if self.temp_bytes is None:
      return None
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def memory_of(compiled: Any) -> tuple[int | None, int | None, int | None, int | None]:
  """(argument, output, alias, temp) bytes per device of a compiled step's memory_analysis()."""
  stats = compiled.memory_analysis()
  fields = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
  )
  return tuple(None if stats is None else int(getattr(stats, f)) for f in fields)


def compile_train_step(
  cfg: config_lib.TrainConfig,
  batch_size: int | None = None,
  devices: Sequence[Any] | None = None,
) -> CompiledStep:
  """Lowers and compiles ``cfg``'s train step on this host's devices for abstract inputs.

  Args:
    cfg: the config (``model.vocab_size`` None: ``data.vocab_size`` rounded up to 128).
    batch_size: compile for this global batch instead of ``cfg.batch_size``.
    devices: the devices to compile for (default: every device JAX finds), e.g. a TPU
      topology's (``cce_jax.aot.tpu.tpu_devices``) or deviceless GPUs
      (``cce_jax.aot.gpu.gpu_devices``).

  Raises:
    ConfigError: a mesh or sharding the config asks for that the devices cannot provide.
  """
  from train import trainer  # imports jax
  from train.sharding import make_mesh
  from train.step import build_program

  if batch_size is not None:
    cfg = dataclasses.replace(cfg, batch_size=batch_size)
  cfg = trainer.with_vocab(cfg, cfg.model.vocab_size or cfg.data.vocab_size)
  mesh = make_mesh(cfg.mesh, devices)
  program = build_program(cfg, mesh)
  lowered = program.lower_train_step()
  if devices is not None and mesh.devices.flat[0].platform == "gpu":
    from cce_jax.aot import gpu  # deviceless: its errors name a missing ptxas / libdevice

    compiled = gpu.compile_lowered(lowered)
  else:
    compiled = lowered.compile()
  return CompiledStep(cfg, dict(mesh.shape), compiled, *memory_of(compiled))


def gib(value: int | float | None) -> str:
  """Bytes as "12.34 GiB" ("n/a" for None)."""
  return "n/a" if value is None else f"{value / GIB:.2f} GiB"


class _Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line (exit status 2), not usage + error."""

  def error(self, message: str):
    self.exit(EXIT_BAD_CONFIG, f"{self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(
    prog="python -m train.aot",
    description="Compile a trainer config's step for abstract inputs on forced host devices, "
    "print its per-device memory, and fail (exit 1) when the peak exceeds the "
    "config's hardware.hbm_gib. Exit 2: a bad config or argument.",
    epilog="Example: python -m train.aot configs/llama3_8b_v5p32.yaml grad_accum_steps=16",
  )
  parser.add_argument("config", metavar="CONFIG.yaml", help="a trainer config file")
  parser.add_argument(
    "overrides",
    nargs="*",
    metavar="key=value",
    help="config overrides, as for python -m train (model.num_layers=2)",
  )
  devices = parser.add_mutually_exclusive_group()
  devices.add_argument(
    "--devices",
    type=int,
    metavar="N",
    help="compile on N forced CPU devices (default: hardware.chips of the "
    "config, else the devices JAX finds)",
  )
  devices.add_argument(
    "--real-devices",
    action="store_true",
    help="compile for this host's accelerators (on a multi-host slice: start "
    "it on every host) and check their reported memory limit too",
  )
  parser.add_argument(
    "--gpu",
    nargs="?",
    const="",
    metavar="NAME",
    help="compile with XLA:GPU, deviceless, for NAME GPUs (a100, h100, h200; default: the "
    "config's hardware.chip) on this host; combine with --devices N (needs the gpu-aot extra)",
  )
  devices.add_argument(
    "--topology",
    nargs="?",
    const=TOPOLOGY_FROM_CONFIG,
    metavar="TOPOLOGY",
    help="compile for this TPU slice (e.g. v5p:2x2x4) with the TPU compiler, on this CPU host "
    "(needs libtpu: pip install -e '.[tpu-aot]'); without a value: the slice of the config's "
    "hardware.chip and hardware.chips",
  )
  return parser


def _gpu_devices(args: argparse.Namespace, cfg: config_lib.TrainConfig) -> tuple[str, list[Any]]:
  """(GPU name, deviceless devices) for ``--gpu``.

  Raises:
    ConfigError: no GPU named and none in hardware.chip, or one without a target config.
    cce_jax.aot.gpu.GpuAotUnavailable: the CUDA plugin is not installed.
  """
  from cce_jax.aot import gpu

  name = args.gpu or cfg.hardware.chip
  if name not in gpu.GPUS:
    source = f"--gpu {args.gpu}" if args.gpu else f"hardware.chip={cfg.hardware.chip!r}"
    raise config_lib.ConfigError(
      f"{source} names no GPU with a target config: pass --gpu one of {sorted(gpu.GPUS)}"
    )
  count = args.devices if args.devices is not None else (cfg.hardware.chips or 1)
  force_host_devices(1)  # JAX on the CPU; the GPUs are deviceless
  return name, gpu.gpu_devices(name, count)


def _gpu_unavailable(error: BaseException) -> bool:
  """Whether ``error`` is ``cce_jax.aot.gpu.GpuAotUnavailable`` (a missing install)."""
  module = sys.modules.get("cce_jax.aot.gpu")
  return module is not None and isinstance(error, module.GpuAotUnavailable)


def tpu_topology(cfg: config_lib.TrainConfig, requested: str) -> str:
  """The TPU topology to compile for: ``requested``, or the config's hardware slice.

  Raises:
    ConfigError: no topology can be derived from the config, or a malformed one.
  """
  from cce_jax.aot import tpu

  hardware = cfg.hardware
  if requested != TOPOLOGY_FROM_CONFIG:
    try:
      tpu.parse_topology(requested)
    except ValueError as error:
      raise config_lib.ConfigError(f"--topology: {error}") from None
    return requested
  if hardware.chip not in tpu.GENERATIONS:
    raise config_lib.ConfigError(
      f"--topology needs a value: hardware.chip is {hardware.chip!r}, not a TPU of "
      f"{tpu.GENERATIONS}; name the slice, e.g. --topology v5p:2x2x4"
    )
  try:
    return tpu.default_topology(hardware.chip, hardware.chips)
  except ValueError as error:
    raise config_lib.ConfigError(f"hardware.chips: {error}") from None


def topology_limit_bytes(cfg: config_lib.TrainConfig, topology: str) -> float:
  """The per-device memory of ``topology``'s chips: ``hardware.hbm_gib`` when the config's
  chip is that generation and sets it, else the generation's HBM in ``train.hardware.CHIPS``."""
  from train import hardware as hardware_lib

  generation = topology.split(":")[0]
  if cfg.hardware.chip == generation and cfg.hardware.hbm_gib is not None:
    return cfg.hardware.hbm_gib * GIB
  return hardware_lib.CHIPS[generation].hbm_gib * GIB


def force_host_devices(count: int) -> None:
  """Makes JAX (not yet initialized) start with ``count`` CPU devices.

  Raises:
    RuntimeError: JAX's backends are already initialized (the count can no longer change).
  """
  from jax._src import xla_bridge

  if xla_bridge.backends_are_initialized():
    raise RuntimeError(
      "train.aot: JAX's backends are already initialized; run "
      "`python -m train.aot` in a fresh process"
    )
  import jax

  # A count in XLA_FLAGS (the older way) would compete with jax_num_cpu_devices.
  flags = [
    f
    for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  os.environ["XLA_FLAGS"] = " ".join(flags)
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", count)


def tpu_costs(compiled: Any) -> str:
  """The TPU compiler's cost numbers of a compiled step, as one phrase."""
  from cce_jax.aot import tpu

  report = tpu.compile_report(compiled)
  flops = "n/a" if report.flops is None else f"{report.flops / 1e12:.1f} TFLOP"
  seconds = (
    "" if report.estimated_seconds is None else f", estimated time {report.estimated_seconds:.3f} s"
  )
  loops = " (the step loops: loop bodies counted once)" if tpu.has_loops(compiled) else ""
  return f"TPU compiler's cost analysis per device: {flops}{loops}{seconds}"


def fits(step: CompiledStep, limit_bytes: float | None) -> bool:
  """Whether the step's peak is known and at most ``limit_bytes`` (True without a limit)."""
  if limit_bytes is None or step.peak_bytes is None:
    return True
  return step.peak_bytes <= limit_bytes


def main(argv: Sequence[str] | None = None) -> int:
  """Compiles one config; 0: fits, 1: does not fit its hardware.hbm_gib, 2: bad config."""
  args = _parser().parse_intermixed_args(argv)
  name = pathlib.Path(args.config).name
  try:
    cfg = config_lib.load(args.config, args.overrides)
  except config_lib.ConfigError as error:
    print(f"{name}: config error: {error}", file=sys.stderr)
    return EXIT_BAD_CONFIG
  if args.devices is not None and args.devices < 1:
    print(f"--devices must be >= 1, got {args.devices}", file=sys.stderr)
    return EXIT_BAD_CONFIG
  if args.gpu is not None and args.real_devices:
    print("--gpu compiles for deviceless GPUs: drop --real-devices", file=sys.stderr)
    return EXIT_BAD_CONFIG
  if args.gpu is not None and args.topology is not None:
    print("--gpu and --topology name two targets: pass one of them", file=sys.stderr)
    return EXIT_BAD_CONFIG
  count = args.devices if args.devices is not None else cfg.hardware.chips
  limit = None if cfg.hardware.hbm_gib is None else cfg.hardware.hbm_gib * GIB
  devices = None
  try:
    if args.gpu is not None:
      from cce_jax.aot import gpu

      gpu_name, devices = _gpu_devices(args, cfg)
      gpu_memory = gpu.target(gpu_name).memory_bytes
      limit = gpu_memory if limit is None else min(limit, gpu_memory)
    elif args.topology is not None:
      from cce_jax.aot import tpu

      topology = tpu_topology(cfg, args.topology)
      if not tpu.has_libtpu():
        print(
          f"--topology {topology}: the TPU compiler (libtpu) is not installed: {tpu.INSTALL_HINT}",
          file=sys.stderr,
        )
        return EXIT_BAD_CONFIG
      force_host_devices(1)
      try:
        devices = tpu.tpu_devices(topology)
      except ValueError as error:
        print(f"--topology: {error}".splitlines()[0], file=sys.stderr)
        return EXIT_BAD_CONFIG
      limit = topology_limit_bytes(cfg, topology)
    elif args.real_devices:
      from train import distributed

      distributed.initialize(cfg.distributed)
    elif count is not None:
      force_host_devices(count)
    step = compile_train_step(cfg, devices=devices)
  except config_lib.ConfigError as error:
    print(f"{name}: config error: {error}", file=sys.stderr)
    return EXIT_BAD_CONFIG
  except RuntimeError as error:
    if not _gpu_unavailable(error):
      raise
    print(f"{name}: {error}", file=sys.stderr)  # what to install
    return EXIT_BAD_CONFIG
  import jax

  if args.real_devices:
    from train import preflight

    device_limit = preflight.device_memory_limit(jax.local_devices()[0])
    if device_limit is not None:
      limit = device_limit if limit is None else min(limit, device_limit)
  cfg = step.config
  how = "" if args.gpu is None else " (XLA:GPU deviceless, without autotuning)"
  devices = devices or jax.devices()
  print(
    f"{name}: compiled for {len(devices)} {devices[0].device_kind} devices{how}; "
    f"mesh {step.mesh_shape}, batch {cfg.batch_size} x {cfg.seq_len} in "
    f"{cfg.grad_accum_steps} micro-batches, V={cfg.model.vocab_size}, loss {cfg.loss_impl}; "
    f"per device: arguments {gib(step.argument_bytes)}, temporaries {gib(step.temp_bytes)}, "
    f"peak {gib(step.peak_bytes)}",
    flush=True,
  )
  if args.topology is not None:
    print(f"{name}: {tpu_costs(step.compiled)}", flush=True)
  if limit is None:
    print(f"{name}: no memory limit to check (the config sets no hardware.hbm_gib)")
    return 0
  hardware = cfg.hardware
  target = f"{hardware.chips} x {hardware.chip}" if hardware.chip else "the devices"
  if args.topology is not None:
    target = f"TPU {topology}, TPU compiler"
  if not fits(step, limit):
    print(
      f"{name}: does NOT fit: peak {gib(step.peak_bytes)} per device > {gib(limit)} "
      f"({target}); raise grad_accum_steps, lower batch_size, shard more (mesh), or set "
      "model.remat=true / model.attention_chunk",
      flush=True,
    )
    return EXIT_DOES_NOT_FIT
  print(
    f"{name}: fits: peak {gib(step.peak_bytes)} per device <= {gib(limit)} ({target})", flush=True
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
