"""The training loop: data, state (fresh or restored), steps, metrics, evaluation, checkpoints.

``run(config)`` trains ``config.steps`` optimizer steps in ``config.workdir``, resuming from the
newest checkpoint found there. SIGTERM (preemption) makes it save a checkpoint at the current
step and return cleanly; the next run with the same workdir continues from it, and on CPU
reproduces the uninterrupted run's losses exactly.

The workdir is a local path or a Cloud Storage URI (``gs://bucket/run``, e.g. on a Cloud TPU
pod, where every host must see it): it is handled through ``etils.epath``, which keeps the URI
intact (``pathlib`` would collapse it to ``gs:/bucket/run``). Cloud Storage needs the ``gcp``
extra (``gcsfs`` for ``etils.epath``, ``google-cloud-storage`` for TensorBoard).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from etils import epath
from jax.experimental import multihost_utils

from cce_jax.filtering import cdiv
from train import config as config_lib
from train import data, distributed, paths, preflight, progress
from train.checkpoint import Checkpointer
from train.metrics import MetricsWriter
from train.sharding import make_mesh
from train.step import Program, build_program

CHECKPOINT_DIR = "checkpoints"
VOCAB_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What a finished (or preempted) run reports."""

  # The last step completed (== config.steps unless stopped by SIGTERM).
  step: int
  # The step the run started or resumed from.
  start_step: int
  # Whether SIGTERM stopped the run early (after saving a checkpoint).
  preempted: bool
  # The metrics records of this run (process 0; including those of resumed-from runs).
  history: list[dict[str, Any]]
  # The workdir, as pathlib would print it locally; a URI (gs://bucket/run) unchanged.
  workdir: str


def with_vocab(cfg: config_lib.TrainConfig, data_vocab: int) -> config_lib.TrainConfig:
  """``cfg`` with ``model.vocab_size`` set: the tokenizer's size rounded up to 128 if unset.

  Raises:
    ConfigError: a configured vocabulary smaller than the data's.
  """
  vocab = cfg.model.vocab_size
  if vocab is None:
    vocab = cdiv(data_vocab, VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  elif vocab < data_vocab:
    raise config_lib.ConfigError(
        f"model.vocab_size={vocab} is smaller than the data's vocabulary ({data_vocab})")
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def write_config(workdir: epath.Path, cfg: config_lib.TrainConfig) -> None:
  """Creates ``workdir`` if missing and writes ``cfg`` to its ``config.yaml``."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.yaml").write_text(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))


class _StopFlag:
  """Set by SIGTERM; all processes agree on it before acting."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.max(flags))


def _memory_in_use() -> dict[str, float]:
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_in_use" not in stats:
    return {}
  return {"memory_gb": stats["bytes_in_use"] / 1e9}


def _global_batch(program: Program, local_tokens: np.ndarray) -> jax.Array:
  cfg = program.config
  return jax.make_array_from_process_local_data(
      program.batch_sharding, np.asarray(local_tokens, np.int32), (cfg.batch_size, cfg.seq_len))


def evaluate(program: Program, params: Any, prepared: data.PreparedData,
             rows: tuple[int, int]) -> float:
  """Mean next-token loss over ``eval_batches`` batches of the held-out split."""
  cfg = program.config
  loader = data.make_loader(
      prepared, split="eval", seq_len=cfg.seq_len, global_batch_size=cfg.batch_size,
      seed=cfg.seed, shuffle=False, process_index=rows[0], process_count=rows[1],
      num_epochs=None)
  total, count = 0.0, 0.0
  for _, batch in zip(range(cfg.eval_batches), loader, strict=False):
    loss_sum, num = program.eval_step(params, _global_batch(program, batch["tokens"]))
    total, count = total + float(loss_sum), count + float(num)
  return total / max(count, 1.0)


def _describe(program: Program, compiled: Any, prepared: data.PreparedData,
              start_step: int) -> str:
  """One line about the run: sizes, mesh, loss, and the compiled step's memory."""
  cfg = program.config
  num_params = sum(x.size for x in jax.tree.leaves(program.abstract_state.params))
  text = (f"{'resuming from step ' + str(start_step) if start_step else 'starting'}: "
          f"{num_params / 1e6:.1f}M parameters, vocabulary {cfg.model.vocab_size}, "
          f"{prepared.num_train_tokens:,} training and {prepared.num_eval_tokens:,} eval tokens, "
          f"mesh {dict(program.mesh.shape)}, loss {cfg.loss_impl}")
  memory = compiled.memory_analysis()
  if memory is not None:
    text += (f"; train step memory: arguments {memory.argument_size_in_bytes / 1e9:.2f} GB, "
             f"temporaries {memory.temp_size_in_bytes / 1e9:.2f} GB")
  return text


@dataclasses.dataclass
class _Loop:
  """The step loop of one run (after the state is initialized or restored)."""

  program: Program
  compiled: Any
  checkpointer: Checkpointer
  writer: MetricsWriter
  prepared: data.PreparedData
  rows: tuple[int, int]
  stop: _StopFlag

  def run(self, state: Any, train_iterator: Any, start_step: int) -> tuple[int, bool]:
    """Trains from ``start_step`` to ``config.steps``; (last step, stopped by SIGTERM)."""
    cfg = self.program.config
    step = start_step
    throughput = progress.Throughput.of(cfg, jax.devices())
    last_time, last_step = time.perf_counter(), step
    while step < cfg.steps:
      batch = next(train_iterator)
      state, metrics = self.compiled(state, _global_batch(self.program, batch["tokens"]))
      step += 1
      self.writer.advance()
      evaluate_now = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
      if step % cfg.log_every == 0 or step == cfg.steps or evaluate_now:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        step_time = (now - last_time) / (step - last_step)
        last_time, last_step = now, step
        values.update(throughput.metrics(step, step_time), **_memory_in_use())
        if evaluate_now:
          values["eval_loss"] = evaluate(self.program, state.params, self.prepared, self.rows)
          last_time = time.perf_counter()  # evaluation time is not step time
        self.writer.write(step, values)
      preempted = step < cfg.steps and self.stop.agreed()
      if preempted or step % cfg.checkpoint_every == 0 or step == cfg.steps:
        self.checkpointer.save(step, state, train_iterator)
      if preempted:
        self.writer.message(f"SIGTERM: saved a checkpoint at step {step}; stopping")
        return step, True
    return step, False


def run(cfg: config_lib.TrainConfig) -> RunResult:
  """Trains ``cfg.steps`` steps in ``cfg.workdir`` (resuming from its newest checkpoint).

  ``jax.distributed`` must already be initialized for a multi-host run (``train.cli`` does
  it per ``cfg.distributed``).

  Raises:
    ConfigError: a config the data, the devices or the mesh cannot satisfy.
  """
  workdir = paths.workdir_path(cfg.workdir)
  is_writer = jax.process_index() == 0
  try:
    prepared = data.prepare(cfg.data)
  except ValueError as error:  # the data the config names is missing or malformed
    raise config_lib.ConfigError(str(error)) from error
  preflight.check_data(cfg, prepared.num_train_tokens, prepared.num_eval_tokens)
  cfg = with_vocab(cfg, prepared.vocab_size)
  mesh = make_mesh(cfg.mesh)
  program = build_program(cfg, mesh)
  rows = distributed.process_rows(program.batch_sharding, cfg.batch_size)
  train_loader = data.make_loader(
      prepared, split="train", seq_len=cfg.seq_len, global_batch_size=cfg.batch_size,
      seed=cfg.seed, shuffle=cfg.data.shuffle, process_index=rows[0], process_count=rows[1],
      worker_count=cfg.data.worker_count)
  train_iterator = iter(train_loader)
  checkpointer = Checkpointer(workdir / CHECKPOINT_DIR, keep=cfg.keep_checkpoints)
  if is_writer:
    write_config(workdir, cfg)

  with jax.set_mesh(mesh), _StopFlag() as stop:
    start_step = checkpointer.latest_step() or 0
    writer = MetricsWriter(workdir, total_steps=cfg.steps, start_step=start_step,
                           enabled=is_writer, progress=cfg.progress,
                           tensorboard=cfg.tensorboard)
    step, preempted = start_step, False
    if start_step < cfg.steps:
      compiled = program.lower_train_step().compile()
      preflight.check_compiled(compiled, program.mesh)
      if start_step:
        state = checkpointer.restore(start_step, program.abstract_state, train_iterator)
      else:
        state = program.init(jnp.asarray(cfg.seed, jnp.int32))
      writer.message(_describe(program, compiled, prepared, start_step))
      loop = _Loop(program, compiled, checkpointer, writer, prepared, rows, stop)
      step, preempted = loop.run(state, train_iterator, start_step)
    checkpointer.close()
    writer.plot()
    writer.close()
  return RunResult(step=step, start_step=start_step, preempted=preempted,
                   history=writer.history, workdir=os.fspath(workdir))
