"""Compile a config's train step ahead of time, with abstract inputs, and report its memory.

    python -m train.aot CONFIG.yaml [CONFIG.yaml ...] [key=value ...]

For each config, builds the mesh over this host's devices (forced CPU devices work too:
``XLA_FLAGS=--xla_force_host_platform_device_count=8``), lowers and compiles the jitted train
step for ``jax.ShapeDtypeStruct`` inputs carrying their shardings (nothing is allocated or
run, no data is read) and prints ``memory_analysis()`` per device. A config that cannot be
sharded or compiled fails here, on a laptop, rather than on a TPU pod. The vocabulary of a
config without ``model.vocab_size`` is taken as ``data.vocab_size`` rounded up to 128.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from train import config as config_lib


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


def compile_train_step(cfg: config_lib.TrainConfig, batch_size: int | None = None) -> CompiledStep:
  """Lowers and compiles ``cfg``'s train step on this host's devices for abstract inputs.

  Args:
    cfg: the config (``model.vocab_size`` None: ``data.vocab_size`` rounded up to 128).
    batch_size: compile for this global batch instead of ``cfg.batch_size``.

  Raises:
    ConfigError: a mesh or sharding the config asks for that the devices cannot provide.
  """
  from train import trainer  # imports jax
  from train.sharding import make_mesh
  from train.step import build_program

  if batch_size is not None:
    cfg = dataclasses.replace(cfg, batch_size=batch_size)
  cfg = trainer.with_vocab(cfg, cfg.model.vocab_size or cfg.data.vocab_size)
  mesh = make_mesh(cfg.mesh)
  program = build_program(cfg, mesh)
  compiled = program.lower_train_step().compile()
  stats = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes")
  values = [None if stats is None else int(getattr(stats, f)) for f in fields]
  return CompiledStep(cfg, dict(mesh.shape), compiled, *values)


def _gb(value: int | None) -> str:
  return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def main(argv: Sequence[str] | None = None) -> int:
  """Compiles each config given; exit status 0 if all compile, 2 for a bad config."""
  argv = list(sys.argv[1:] if argv is None else argv)
  paths = [a for a in argv if "=" not in a]
  overrides = [a for a in argv if "=" in a]
  if not paths:
    print(__doc__)
    return 2
  for path in paths:
    try:
      step = compile_train_step(config_lib.load(path, overrides))
    except config_lib.ConfigError as error:
      print(f"{path}: config error: {error}", file=sys.stderr)
      return 2
    cfg = step.config
    print(f"{pathlib.Path(path).name}: compiled; mesh {step.mesh_shape}, "
          f"batch {cfg.batch_size} x {cfg.seq_len} in {cfg.grad_accum_steps} micro-batches, "
          f"V={cfg.model.vocab_size}, loss {cfg.loss_impl}; per device: arguments "
          f"{_gb(step.argument_bytes)}, temporaries {_gb(step.temp_bytes)}, "
          f"peak {_gb(step.peak_bytes)}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
