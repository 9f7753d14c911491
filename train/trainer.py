"""The training loop: data, state (fresh or restored), steps, metrics, evaluation, checkpoints.

``run(config)`` trains ``config.steps`` optimizer steps in ``config.workdir``, resuming from the
newest checkpoint found there that restores. SIGTERM (preemption) or SIGINT (Ctrl-C) makes it
save a checkpoint at the current step and return cleanly; the next run with the same workdir
continues from it, and on CPU reproduces the uninterrupted run's losses exactly.

What keeps a run safe: the workdir is checked writable and locked (``train.workdir_lock``)
before anything compiles; a resume compares the config with the stored ``config.yaml``
(``train.resume``) before restoring, and rewrites that file only once the state is restored;
a step's checkpoint is saved before it is evaluated; every way out (normal end, SIGTERM,
SIGINT, an exception) waits for the asynchronous saves to commit; a step whose loss or
gradient norm is not finite is skipped (``max_skipped_steps`` in a row stop the run).

The workdir is a local path or a Cloud Storage URI (``gs://bucket/run``, e.g. on a Cloud TPU
pod, where every host must see it): it is handled through ``etils.epath``, which keeps the URI
intact (``pathlib`` would collapse it to ``gs:/bucket/run``). Cloud Storage needs the ``gcp``
extra (``gcsfs`` for ``etils.epath``, ``google-cloud-storage`` for TensorBoard).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from etils import epath
from jax.experimental import multihost_utils

from cce_jax.filtering import cdiv
from train import config as config_lib
from train import data, distributed, paths, preflight, progress, resume
from train.checkpoint import Checkpointer
from train.errors import RunError
from train.metrics import MetricsWriter
from train.sharding import make_mesh
from train.step import Program, build_program
from train.workdir_lock import WorkdirLock, WorkdirLockedError

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.yaml"
VOCAB_MULTIPLE = 128


class NonFiniteError(RunError):
  """``max_skipped_steps`` steps in a row had a non-finite loss or gradient norm."""


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What a finished (or preempted) run reports."""

  # The last step completed (== config.steps unless stopped by SIGTERM).
  step: int
  # The step the run started or resumed from.
  start_step: int
  # Whether SIGTERM or SIGINT stopped the run early (after saving a checkpoint).
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
      f"model.vocab_size={vocab} is smaller than the data's vocabulary ({data_vocab})"
    )
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def write_config(workdir: epath.Path, cfg: config_lib.TrainConfig) -> None:
  """Creates ``workdir`` if missing and writes ``cfg`` to its ``config.yaml``."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / CONFIG_FILE).write_text(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))


def _warn(text: str) -> None:
  """A warning line on stderr (process 0 only)."""
  if jax.process_index() == 0:
    print(text, file=sys.stderr, flush=True)


def check_writable(workdir: epath.Path) -> None:
  """Creates ``workdir`` and its checkpoint directory and writes (then removes) a probe file in
  each, so that an unwritable one fails now, not in Orbax's background thread much later.

  Raises:
    ConfigError: ``workdir`` is a file, or it or its checkpoint directory cannot be written.
  """
  probe_name = f".write_probe.{jax.process_index()}.{uuid.uuid4().hex[:8]}"
  for directory in (workdir, workdir / CHECKPOINT_DIR):
    try:
      directory.mkdir(parents=True, exist_ok=True)
      probe = directory / probe_name
      probe.write_text("")
      probe.unlink()
    except FileExistsError as error:
      raise config_lib.ConfigError(
        f"workdir={os.fspath(workdir)!r}: {os.fspath(directory)} exists and is not a "
        f"directory ({error.strerror or error}); choose another workdir"
      ) from None
    except OSError as error:
      raise config_lib.ConfigError(
        f"workdir={os.fspath(workdir)!r}: cannot write in {os.fspath(directory)} "
        f"({error.strerror or error}); fix its permissions or choose another workdir"
      ) from None


def _agree(ok: bool) -> bool:
  """Whether ``ok`` holds on process 0 (every process gets its answer)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


class _StopFlag:
  """Set by SIGTERM or SIGINT; all processes agree on it before acting. A second SIGINT
  raises KeyboardInterrupt (the run still waits for its in-flight saves)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name = "SIGTERM"
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    for signum in self.SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = signal.Signals(signum).name

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
    program.batch_sharding, np.asarray(local_tokens, np.int32), (cfg.batch_size, cfg.seq_len)
  )


def evaluate(
  program: Program, params: Any, prepared: data.PreparedData, rows: tuple[int, int]
) -> dict[str, float]:
  """Mean next-token loss (``eval_loss``), accuracy of the argmax (``eval_accuracy``) and
  softmax entropy in nats (``eval_entropy``, by ``cce_jax.token_stats``) over ``eval_batches``
  batches of the held-out split.

  Raises:
    ConfigError: the held-out split cannot serve a batch (the data layer's message).
  """
  cfg = program.config
  try:
    loader = data.make_loader(
      prepared,
      split="eval",
      seq_len=cfg.seq_len,
      global_batch_size=cfg.batch_size,
      seed=cfg.seed,
      shuffle=False,
      process_index=rows[0],
      process_count=rows[1],
      num_epochs=None,
    )
  except (TypeError, ValueError) as error:
    raise config_lib.ConfigError(f"evaluation (eval_every={cfg.eval_every}): {error}") from None
  totals, count = {"loss": 0.0}, 0.0
  for _, batch in zip(range(cfg.eval_batches), loader, strict=False):
    loss_sum, num, stat_sums = program.eval_step(params, _global_batch(program, batch["tokens"]))
    count += float(num)
    for name, value in {"loss": loss_sum, **stat_sums}.items():
      totals[name] = totals.get(name, 0.0) + float(value)
  return {f"eval_{name}": total / max(count, 1.0) for name, total in totals.items()}


def _describe(program: Program, compiled: Any, prepared: data.PreparedData, start_step: int) -> str:
  """One line about the run: sizes, mesh, loss, and the compiled step's memory."""
  cfg = program.config
  num_params = sum(x.size for x in jax.tree.leaves(program.abstract_state.params))
  text = (
    f"{'resuming from step ' + str(start_step) if start_step else 'starting'}: "
    f"{num_params / 1e6:.1f}M parameters, vocabulary {cfg.model.vocab_size}, "
    f"{prepared.num_train_tokens:,} training and {prepared.num_eval_tokens:,} eval tokens, "
    f"mesh {dict(program.mesh.shape)}, loss {cfg.loss_impl}"
  )
  memory = compiled.memory_analysis()
  if memory is not None:
    text += (
      f"; train step memory: arguments {memory.argument_size_in_bytes / 1e9:.2f} GB, "
      f"temporaries {memory.temp_size_in_bytes / 1e9:.2f} GB"
    )
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
    """Trains from ``start_step`` to ``config.steps``; (last step, stopped by a signal).

    A step's checkpoint is saved before it is evaluated, so a failing evaluation loses no
    training.

    Raises:
      NonFiniteError: ``max_skipped_steps`` steps in a row were skipped (non-finite).
      ConfigError: the evaluation cannot read a batch of the held-out split.
    """
    cfg = self.program.config
    step = start_step
    throughput = progress.Throughput.of(cfg, jax.devices())
    last_time, last_step = time.perf_counter(), step
    previous = self.writer.history[-1] if self.writer.history else {}
    skipped_total, skipped_in_a_row = int(previous.get("skipped_steps", 0)), 0
    while step < cfg.steps:
      batch = _next_batch(train_iterator)
      state, metrics = self.compiled(state, _global_batch(self.program, batch["tokens"]))
      step += 1
      self.writer.advance()
      # One () int32 read per step (the NaN guard's verdict); the rest only at log steps.
      if int(metrics["skipped"]):
        skipped_total, skipped_in_a_row = skipped_total + 1, skipped_in_a_row + 1
        self._report_skipped(step, metrics, skipped_in_a_row)
      else:
        skipped_in_a_row = 0
      preempted = step < cfg.steps and self.stop.agreed()
      if preempted or step % cfg.checkpoint_every == 0 or step == cfg.steps:
        self.checkpointer.save(step, state, train_iterator)
      evaluate_now = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
      if step % cfg.log_every == 0 or step == cfg.steps or evaluate_now:
        values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "skipped"}
        now = time.perf_counter()
        step_time = (now - last_time) / (step - last_step)
        last_time, last_step = now, step
        values.update(
          throughput.metrics(step, step_time), skipped_steps=skipped_total, **_memory_in_use()
        )
        if evaluate_now:
          values.update(evaluate(self.program, state.params, self.prepared, self.rows))
          last_time = time.perf_counter()  # evaluation time is not step time
        self.writer.write(step, values)
      if preempted:
        self.writer.message(f"{self.stop.signal_name}: saved a checkpoint at step {step}; stopping")
        return step, True
    return step, False

  def _report_skipped(self, step: int, metrics: dict[str, jax.Array], in_a_row: int) -> None:
    """Warns about a skipped step; raises NonFiniteError at ``max_skipped_steps`` in a row."""
    cfg = self.program.config
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    _warn(
      f"warning: step {step}: loss {loss}, gradient norm {grad_norm}: not finite, update "
      f"skipped ({in_a_row} in a row, max_skipped_steps={cfg.max_skipped_steps})"
    )
    if in_a_row >= cfg.max_skipped_steps:
      raise NonFiniteError(
        f"steps {step - in_a_row + 1}-{step}: loss or gradient norm not finite "
        f"{in_a_row} times in a row; stopping (no checkpoint holds non-finite parameters). "
        f"Lower optim.learning_rate (now {cfg.optim.learning_rate}) or check the data, or "
        "raise max_skipped_steps"
      )


def run(cfg: config_lib.TrainConfig) -> RunResult:
  """Trains ``cfg.steps`` steps in ``cfg.workdir`` (resuming from its newest usable checkpoint).

  ``jax.distributed`` must already be initialized for a multi-host run (``train.cli`` does
  it per ``cfg.distributed``). Process 0 holds the workdir's lock for the whole run.

  Raises:
    ConfigError: a config the data, the devices, the mesh, the workdir or the workdir's
      checkpoints cannot satisfy.
    RunError: the workdir is locked by another run, no checkpoint restores, a damaged
      ``metrics.jsonl``, or ``max_skipped_steps`` non-finite steps in a row.
  """
  workdir = paths.workdir_path(cfg.workdir)
  is_writer = jax.process_index() == 0
  check_writable(workdir)
  lock = WorkdirLock(workdir, force=cfg.force_unlock, warn=_warn)
  locked: WorkdirLockedError | None = None
  if is_writer:
    try:
      lock.acquire()
    except WorkdirLockedError as error:
      locked = error
  if not _agree(locked is None):
    raise locked or WorkdirLockedError(f"process 0 could not lock workdir {os.fspath(workdir)}")
  try:
    return _run_locked(cfg, workdir, is_writer)
  finally:
    lock.release()


def _next_batch(iterator: Any) -> Any:
  """``next(iterator)``; a bad window (a token id outside the vocabulary of lazily read
  shards) as a one-line ConfigError.

  Raises:
    ConfigError: the data loader found data the config does not describe.
  """
  try:
    return next(iterator)
  except ValueError as error:
    raise config_lib.ConfigError(f"data: {str(error).splitlines()[0]}") from None


def _prepare_data(cfg: config_lib.TrainConfig) -> data.PreparedData:
  """``data.prepare``, its errors (a missing path, a bad .npy, ...) as ConfigError."""
  try:
    return data.prepare(cfg.data)
  except (TypeError, ValueError, OSError) as error:
    raise config_lib.ConfigError(f"data: {error}") from None


def _check_resume(
  workdir: epath.Path, checkpointer: Checkpointer, cfg: config_lib.TrainConfig
) -> None:
  """Compares ``cfg`` with the config the checkpoints were written with (if both exist).

  Raises:
    ConfigError: a change the checkpoints cannot be restored with.
  """
  if not checkpointer.manager.all_steps():
    return
  stored = resume.read_stored(workdir / CONFIG_FILE)
  if stored is None:
    _warn(
      f"warning: {os.fspath(workdir / CONFIG_FILE)} is missing or unreadable: resuming "
      "without comparing the config with the checkpoints'"
    )
    return
  changes = resume.compare(stored, cfg)
  if changes:
    _warn("warning: resuming with changed settings: " + "; ".join(changes))


def _run_locked(cfg: config_lib.TrainConfig, workdir: epath.Path, is_writer: bool) -> RunResult:
  prepared = _prepare_data(cfg)
  preflight.check_data(cfg, prepared.num_train_tokens, prepared.num_eval_tokens)
  cfg = with_vocab(cfg, prepared.vocab_size)
  mesh = make_mesh(cfg.mesh)
  program = build_program(cfg, mesh)
  rows = distributed.process_rows(program.batch_sharding, cfg.batch_size)
  try:
    train_loader = data.make_loader(
      prepared,
      split="train",
      seq_len=cfg.seq_len,
      global_batch_size=cfg.batch_size,
      seed=cfg.seed,
      shuffle=cfg.data.shuffle,
      process_index=rows[0],
      process_count=rows[1],
      worker_count=cfg.data.worker_count,
    )
  except (TypeError, ValueError) as error:
    raise config_lib.ConfigError(f"data: {error}") from None
  train_iterator = iter(train_loader)
  checkpointer = Checkpointer(workdir / CHECKPOINT_DIR, keep=cfg.keep_checkpoints)
  writer = None
  try:
    _check_resume(workdir, checkpointer, cfg)
    with jax.set_mesh(mesh), _StopFlag() as stop:
      newest = checkpointer.latest_step() or 0
      compiled = None
      if newest < cfg.steps:
        # Compiled before any state exists, so that a step that cannot fit the devices stops
        # here with the numbers (train/preflight.py), not with an out-of-memory error later.
        compiled = program.lower_train_step().compile()
        preflight.check_compiled(compiled, program.mesh)
      start_step, state = newest, None
      if 0 < newest < cfg.steps:
        start_step, state = checkpointer.restore_newest(
          program.abstract_state, train_iterator, warn=_warn, set_aside=is_writer
        )
        if start_step != newest:  # some were set aside: every process re-reads the steps
          if jax.process_count() > 1:
            multihost_utils.sync_global_devices("train: unusable checkpoints set aside")
          checkpointer.reload()
      writer = MetricsWriter(
        workdir,
        total_steps=cfg.steps,
        start_step=start_step,
        enabled=is_writer,
        progress=cfg.progress,
        tensorboard=cfg.tensorboard,
        warn=_warn,
      )
      step, preempted = start_step, False
      if start_step < cfg.steps:
        if state is None:
          state = program.init(jnp.asarray(cfg.seed, jnp.int32))
        if is_writer:  # only now: the checkpoints and this config agree
          write_config(workdir, cfg)
        writer.message(_describe(program, compiled, prepared, start_step))
        loop = _Loop(program, compiled, checkpointer, writer, prepared, rows, stop)
        step, preempted = loop.run(state, train_iterator, start_step)
      if cfg.plot:
        writer.plot()
  finally:
    checkpointer.close()  # waits for the in-flight saves, on every way out
    if writer is not None:
      writer.close()
  return RunResult(
    step=step,
    start_step=start_step,
    preempted=preempted,
    history=writer.history,
    workdir=os.fspath(workdir),
  )
