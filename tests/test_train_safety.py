"""The trainer never loses, corrupts or silently mis-trains a run.

Bad values stop at config time; file-system and data errors are one line with exit status 2;
the workdir is locked; a damaged newest checkpoint falls back to the previous one; a resume
with another model stops before restoring and config.yaml is written only after a restore;
a failing evaluation keeps its step's checkpoint; non-finite steps are skipped; dropout
applies in training only, driven by the checkpointed RNG. Trainer runs are tiny (CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import types
import typing

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testing

from train import checkpoint, cli, config, data, metrics, resume, trainer, validation
from train.sharding import make_mesh
from train.step import build_program
from train.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  with train_testing.session(tmp_path_factory) as base:
    yield base


def _args(base: pathlib.Path, workdir: pathlib.Path, *extra: str) -> list[str]:
  return train_testing.overrides(workdir, base / "data_cache", *extra)


def _one_line_exit_2(capsys, args: list[str]) -> str:
  """Runs the CLI with ``args``; asserts exit status 2 and one stderr line; that line."""
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert err and "\n" not in err and "Traceback" not in err, err
  return err


# --------------------------------------------------------------------------------------------
# Config time: bad values, YAML, the workdir.


@pytest.mark.parametrize(
  "override, message",
  [
    ("optim.learning_rate=.inf", "optim.learning_rate must be > 0 and finite, got inf"),
    ("optim.b1=5", "optim.b1 must be in [0, 1), got 5.0"),
    ("optim.b2=-1", "optim.b2 must be in [0, 1), got -1.0"),
    ("optim.eps=-1", "optim.eps must be >= 0, got -1.0"),
    ("optim.weight_decay=-5", "optim.weight_decay must be >= 0, got -5.0"),
    ("model.norm_eps=-1", "model.norm_eps must be > 0, got -1.0"),
    ("model.norm_eps=.nan", "model.norm_eps must be > 0 and finite, got nan"),
    ("model.rope_theta=0", "model.rope_theta must be > 0, got 0.0"),
    ("loss.z_loss=.inf", "loss.z_loss must be >= 0 and finite, got inf"),
    ("model.attention_chunk=5", "model.attention_chunk=5 must divide seq_len=32"),
    ("loss.cce_impl=XLA", "loss.cce_impl must be one of ('auto', 'xla'"),
    ("loss.filter_eps=5.0", "loss.filter_eps must be 'auto', a float in [0, 1] or null"),
    ("model.final_softcap=.inf", "model.final_softcap must be > 0 or null and finite, got inf"),
    ("seed=-1", "seed must be in [0, 2147483647], got -1"),
    ("optim.end_lr_ratio=.nan", "optim.end_lr_ratio must be in [0, 1] and finite"),
    ("optim.clip_norm=-.inf", "optim.clip_norm must be > 0 or null and finite"),
    ("loss.label_smoothing=1", "loss.label_smoothing must be in [0, 1), got 1.0"),
    ("model.dropout=1", "model.dropout must be in [0, 1), got 1.0"),
    ("max_skipped_steps=0", "max_skipped_steps must be >= 1, got 0"),
    ("workdir=", "workdir must name a directory"),
    ("workdir=' '", "workdir must name a directory"),
  ],
)
def test_bad_values_stop_at_config_time(tmp_path, capsys, override, message):
  args = [f"workdir={tmp_path / 'run'}", *train_testing.TINY_MODEL, "seq_len=32", override]
  err = _one_line_exit_2(capsys, args)
  assert err == f"config error: {err.removeprefix('config error: ')}"
  assert message in err
  assert not (tmp_path / "run").exists()


def _numeric(kind: typing.Any) -> bool:
  """Whether a field of type ``kind`` holds a number (int, float, or either or None)."""
  union = typing.get_origin(kind) in (typing.Union, types.UnionType)
  return any(option in (int, float) for option in (typing.get_args(kind) if union else (kind,)))


@pytest.mark.parametrize(
  "cls, ranges, exempt",
  [
    (config.TrainConfig, config.TRAIN_RANGES, set()),
    (config.ModelConfig, config.MODEL_RANGES, set()),
    (config.LossConfig, config.LOSS_RANGES, {"filter_eps"}),  # "auto", a float, or null
    (config.OptimConfig, config.OPTIM_RANGES, set()),
    (config.MeshConfig, {}, {"data", "fsdp", "tensor"}),  # -1 or >= 1, checked together
  ],
)
def test_every_numeric_field_has_a_range(cls, ranges, exempt):
  hints = typing.get_type_hints(cls)
  numeric = {f.name for f in dataclasses.fields(cls) if _numeric(hints[f.name])}
  assert numeric - exempt == set(ranges), "a numeric field without a declared range"


def test_the_cce_impls_are_cce_jaxs():
  """Every impl cce_jax accepts is a valid loss.cce_impl, and nothing else is."""
  from cce_jax import checks

  for impl in checks.IMPLS:
    assert config.load(None, [f"loss.cce_impl={impl}"]).loss.cce_impl == impl
  with pytest.raises(config.ConfigError, match=r"loss\.cce_impl must be one of"):
    config.load(None, ["loss.cce_impl=pallas"])


def test_range_descriptions():
  assert validation.at_least(1).describe() == ">= 1"
  assert validation.positive(nullable=True).describe() == "> 0 or null"
  assert validation.fraction().describe() == "in [0, 1)"
  assert not validation.fraction().contains(1.0) and validation.fraction().contains(0.0)


def test_yaml_syntax_error_is_one_line(tmp_path, capsys):
  path = tmp_path / "bad.yaml"
  path.write_text("steps: 3\nmodel: {d_model: 8\n")
  err = _one_line_exit_2(capsys, [str(path)])
  assert err.startswith(f"config error: {path}: not valid YAML")


def test_workdir_that_is_a_file_is_one_line(tmp_path, capsys):
  workdir = tmp_path / "file"
  workdir.write_text("not a directory")
  err = _one_line_exit_2(capsys, [f"workdir={workdir}", "steps=1"])
  assert f"workdir={str(workdir)!r}" in err and "not a directory" in err


def test_unwritable_checkpoint_directory_fails_at_once(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  if os.geteuid() == 0:  # root writes anywhere a mode allows nothing: a directory of /proc
    (workdir / "checkpoints").symlink_to("/proc/self")
  else:
    (workdir / "checkpoints").mkdir(mode=0o500)
  err = _one_line_exit_2(capsys, [f"workdir={workdir}", "steps=1"])
  assert "cannot write in" in err and "checkpoints" in err


@pytest.mark.parametrize("make_error", ["missing_path", "two_d_npy", "small_vocab"])
def test_data_errors_are_one_line(tmp_path, capsys, make_error):
  npy = tmp_path / "tokens.npy"
  if make_error == "missing_path":
    extra = ["data.source=text", f"data.paths=[{tmp_path / 'nothing_here.txt'}]"]
    expected = "matches no file"
  elif make_error == "two_d_npy":
    np.save(npy, np.random.default_rng(0).integers(0, 100, (50, 40)))
    extra = ["data.source=tokens", f"data.paths=[{npy}]", "data.vocab_size=100"]
    expected = "1-D"
  else:
    np.save(npy, np.random.default_rng(0).integers(0, 100, 5000))
    # Shards are read lazily: the id is found when the first batch is read (no evaluation).
    extra = ["data.source=tokens", f"data.paths=[{npy}]", "data.vocab_size=50", "eval_every=0"]
    expected = "does not cover token id"
  args = [f"workdir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "steps=1", *extra]
  err = _one_line_exit_2(capsys, args)
  assert err.startswith("config error: data: ") and expected in err


# --------------------------------------------------------------------------------------------
# metrics.jsonl


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n{"step": 3, "lo')
  warnings = []
  records = metrics.read_metrics(path, warnings.append)
  assert records == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}]
  assert len(warnings) == 1 and "torn last line 3" in warnings[0] and str(path) in warnings[0]
  writer = metrics.MetricsWriter(
    tmp_path,
    total_steps=4,
    start_step=2,
    enabled=True,
    progress=False,
    tensorboard=False,
    warn=warnings.append,
  )
  writer.write(3, {"loss": 2.0})
  writer.close()
  assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2, 3]


def test_garbled_metrics_line_names_file_and_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.5}\n{"st#p": 2\n{"step": 3, "loss": 2.0}\n')
  with pytest.raises(metrics.MetricsFileError, match=f"{path}, line 2: not a metrics record"):
    metrics.read_metrics(path)


# --------------------------------------------------------------------------------------------
# The workdir lock.


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def _write_lock(workdir: pathlib.Path, host: str, pid: int) -> None:
  (workdir / LOCK_FILE).write_text(
    json.dumps({"host": host, "pid": pid, "started": "2026-01-02T03:04:05+00:00", "token": "other"})
  )


def test_a_held_lock_refuses_a_second_run_naming_its_holder(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    _write_lock(workdir, socket.gethostname(), holder.pid)
    err = _one_line_exit_2(capsys, [f"workdir={workdir}", "steps=1"])
  finally:
    holder.kill()
    holder.wait()
  assert err.startswith(f"error: workdir {workdir} is in use by another run")
  assert f"host {socket.gethostname()}, pid {holder.pid}, started 2026-01-02T03:04:05" in err
  assert "force_unlock=true" in err
  assert not (workdir / "metrics.jsonl").exists()


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
  _write_lock(tmp_path, socket.gethostname(), _dead_pid())
  warnings = []
  with WorkdirLock(tmp_path, force=False, warn=warnings.append) as lock:
    stored = json.loads((tmp_path / LOCK_FILE).read_text())
    assert stored["pid"] == os.getpid() and stored["token"] == lock.holder.token
  assert len(warnings) == 1 and "a run that is gone" in warnings[0]
  assert not (tmp_path / LOCK_FILE).exists()


def test_lock_of_another_host_needs_force_unlock(tmp_path):
  _write_lock(tmp_path, "some-other-host", 1)
  with pytest.raises(WorkdirLockedError, match="host some-other-host, pid 1"):
    WorkdirLock(tmp_path, force=False, warn=print).acquire()
  warnings = []
  with WorkdirLock(tmp_path, force=True, warn=warnings.append):
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == socket.gethostname()
  assert "force_unlock=true" in warnings[0]


def test_two_locks_at_once(tmp_path):
  first = WorkdirLock(tmp_path, force=False, warn=print)
  first.acquire()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:  # as if the first were another live process on this host
    data_ = json.loads((tmp_path / LOCK_FILE).read_text())
    (tmp_path / LOCK_FILE).write_text(json.dumps({**data_, "pid": holder.pid}))
    with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid}"):
      WorkdirLock(tmp_path, force=False, warn=print).acquire()
  finally:
    holder.kill()
    holder.wait()


# --------------------------------------------------------------------------------------------
# Resuming with another config.


def _stored(cfg: config.TrainConfig) -> dict:
  return resume.flatten(config.to_dict(cfg))


def test_resume_compare_rejects_another_model_naming_both_values():
  old = config.load(None, ["model.vocab_size=256"])
  new = config.load(
    None, ["model.vocab_size=256", "model.d_model=64", "model.tie_embeddings=false", "steps=10"]
  )
  with pytest.raises(config.ConfigError) as error:
    resume.compare(_stored(old), new)
  assert "model.d_model 128 -> 64" in str(error.value)
  assert "model.tie_embeddings True -> False" in str(error.value)
  assert "steps" not in str(error.value)
  with pytest.raises(config.ConfigError, match=r"optim\.clip_norm 1\.0 -> null"):
    resume.compare(
      _stored(old), dataclasses.replace(old, optim=dataclasses.replace(old.optim, clip_norm=None))
    )


def test_resume_compare_lists_allowed_changes():
  old = config.load(None, ["model.vocab_size=256"])
  new = config.load(
    None,
    [
      "model.vocab_size=256",
      "steps=600",
      "optim.learning_rate=1e-3",
      "batch_size=16",
      "seq_len=64",
      "workdir=elsewhere",
    ],
  )
  changes = resume.compare(_stored(old), new)
  assert changes == [
    "batch_size 8 -> 16",
    "optim.learning_rate 0.003 -> 0.001",
    "seq_len 128 -> 64",
    "steps 300 -> 600",
  ]
  assert resume.compare(_stored(old), old) == []


# --------------------------------------------------------------------------------------------
# The jitted steps: dropout and the NaN guard.


def _program(base: pathlib.Path, *extra: str):
  cfg = config.load(None, _args(base, base / "unused", *extra))
  cfg = trainer.with_vocab(cfg, train_testing.VOCAB)
  return build_program(cfg, make_mesh(cfg.mesh))


def _tokens(seed: int) -> jax.Array:
  return jnp.asarray(
    np.random.default_rng(seed).integers(0, train_testing.VOCAB, (8, 32)), jnp.int32
  )


def test_dropout_applies_in_training_never_in_evaluation(base):
  plain, dropped = _program(base), _program(base, "model.dropout=0.3")
  tokens = _tokens(1)
  with jax.set_mesh(plain.mesh):
    state = plain.init(jnp.asarray(0, jnp.int32))
    params = jax.tree.map(jnp.copy, state.params)
    eval_plain = plain.eval_step(params, tokens)
    eval_dropped = dropped.eval_step(params, tokens)
    _, first = dropped.train_step(jax.tree.map(jnp.copy, state), tokens)
    _, again = dropped.train_step(jax.tree.map(jnp.copy, state), tokens)
    other_rng = dataclasses.replace(state, rng=state.rng + 1)
    _, other = dropped.train_step(other_rng, tokens)
  chex.assert_trees_all_equal(eval_plain, eval_dropped)  # evaluation: no dropout
  # Training: dropout changes the loss from the (dropout-free) evaluation loss of the same
  # parameters; the same state (RNG key, step) gives the same loss, another key another one.
  eval_loss = float(eval_dropped[0]) / float(eval_dropped[1])
  assert abs(float(first["loss"]) - eval_loss) > 1e-3
  assert float(first["loss"]) == float(again["loss"])
  assert float(first["loss"]) != float(other["loss"])


def test_non_finite_step_keeps_parameters_and_optimizer_state(base):
  program = _program(base)
  with jax.set_mesh(program.mesh):
    state = program.init(jnp.asarray(0, jnp.int32))
    state, good = program.train_step(state, _tokens(2))
    assert int(good["skipped"]) == 0
    embedding = state.params["embed"]["embedding"]
    poisoned = dataclasses.replace(
      state, params={**state.params, "embed": {"embedding": embedding.at[0, 0].set(jnp.nan)}}
    )
    before = jax.tree.map(np.asarray, poisoned)
    tokens = _tokens(3).at[0, 0].set(0)  # reads the NaN row
    after, bad = program.train_step(poisoned, tokens)
  assert int(bad["skipped"]) == 1 and not math.isfinite(float(bad["loss"]))
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, after.params), before.params)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, after.opt_state), before.opt_state)
  assert int(after.step) == int(before.step) + 1


def test_diverging_run_stops_and_keeps_finite_checkpoints(base, tmp_path, capsys):
  workdir = tmp_path / "run"
  args = _args(
    base,
    workdir,
    "steps=12",
    "optim.learning_rate=1e8",
    "max_skipped_steps=3",
    "checkpoint_every=1",
  )
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert "update skipped (1 in a row, max_skipped_steps=3)" in err
  assert "error: steps " in err and "not finite 3 times in a row" in err
  records = metrics.read_metrics(workdir / "metrics.jsonl")
  # The stopping step is not logged: the two skipped steps before it are.
  assert [r["skipped_steps"] for r in records][-2:] == [1, 2]
  assert not (workdir / LOCK_FILE).exists()
  for step_dir in (workdir / "checkpoints").iterdir():
    manager_params = _params_at(workdir, int(step_dir.name))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(manager_params)), step_dir


def _params_at(workdir: pathlib.Path, step: int) -> dict:
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state", "data"))
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return jax.tree.map(np.asarray, restored.state["params"])


# --------------------------------------------------------------------------------------------
# Whole runs: checkpoints, config.yaml, evaluation failures, dropout across a resume.

RUN_STEPS = ["steps=4", "checkpoint_every=2"]


@pytest.fixture(scope="module")
def finished(base):
  """A finished 4-step run with checkpoints at steps 2 and 4 (plot=false); its workdir."""
  workdir = base / "finished_run"
  train_testing.train(_args(base, workdir, *RUN_STEPS))
  return workdir


def test_plot_false_writes_no_plot(finished):
  assert (finished / "metrics.jsonl").is_file()
  assert not (finished / "loss.png").exists()
  assert not (finished / LOCK_FILE).exists()


def _corrupt(step_dir: pathlib.Path, kind: str) -> None:
  state = step_dir / "state"
  chunks = sorted(
    (p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"),
    key=lambda p: p.stat().st_size,
  )
  if kind == "manifest_deleted":
    (state / "manifest.ocdbt").unlink()
  elif kind == "chunk_garbled":
    raw = bytearray(chunks[-1].read_bytes())
    raw[len(raw) // 4 : len(raw) // 2] = bytes(b ^ 0x5A for b in raw[len(raw) // 4 : len(raw) // 2])
    chunks[-1].write_bytes(bytes(raw))
  elif kind == "chunk_truncated":
    chunks[-1].write_bytes(chunks[-1].read_bytes()[: chunks[-1].stat().st_size // 2])
  elif kind == "iterator_garbled":
    (step_dir / "data" / "process_0-of-1.json").write_text('{"next_ind')
  elif kind == "iterator_missing":
    (step_dir / "data" / "process_0-of-1.json").unlink()
  elif kind == "empty":
    shutil.rmtree(step_dir)
    step_dir.mkdir()


def _iterator(cfg: config.TrainConfig):
  prepared = data.prepare(cfg.data)
  return iter(
    data.make_loader(
      prepared,
      split="train",
      seq_len=cfg.seq_len,
      global_batch_size=cfg.batch_size,
      seed=cfg.seed,
      shuffle=True,
    )
  )


# A failed Orbax restore leaves its pending TensorStore reads (coroutines) to the garbage
# collector, which reports them as unraisable exceptions: expected here, not a test failure.
ABANDONED_READS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@ABANDONED_READS
@pytest.mark.parametrize(
  "kind",
  [
    "manifest_deleted",
    "chunk_garbled",
    "chunk_truncated",
    "iterator_garbled",
    "iterator_missing",
    "empty",
  ],
)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(base, finished, tmp_path, kind):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  _corrupt(workdir / "checkpoints" / "4", kind)
  program = _program(base, *RUN_STEPS)
  warnings = []
  with jax.set_mesh(program.mesh):
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", keep=3)
    step, state = checkpointer.restore_newest(
      program.abstract_state, _iterator(program.config), warn=warnings.append, set_aside=True
    )
    checkpointer.close()
  assert step == 2 and int(state.step) == 2
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.params), _params_at(finished, 2))
  assert f"checkpoint {workdir / 'checkpoints' / '4'} does not restore (" in warnings[0]
  assert "moved the unusable checkpoint" in warnings[1]
  names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert names[0] == "2" and names[1].startswith("4.unusable-") and len(names) == 2


@ABANDONED_READS
def test_no_checkpoint_restores_names_the_directory(base, finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  for step in (2, 4):
    _corrupt(workdir / "checkpoints" / str(step), "manifest_deleted")
  program = _program(base, *RUN_STEPS)
  with jax.set_mesh(program.mesh):
    checkpointer = checkpoint.Checkpointer(workdir / "checkpoints", keep=3)
    with pytest.raises(
      checkpoint.CheckpointError, match=f"no checkpoint in {workdir / 'checkpoints'} restores"
    ):
      checkpointer.restore_newest(
        program.abstract_state, _iterator(program.config), warn=lambda _: None, set_aside=True
      )
    checkpointer.close()


@ABANDONED_READS
def test_resume_skips_a_damaged_checkpoint_and_goes_on(base, finished, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  _corrupt(workdir / "checkpoints" / "4", "chunk_garbled")
  result = train_testing.train(_args(base, workdir, "steps=6", "checkpoint_every=2"))
  err = capsys.readouterr().err
  assert result.start_step == 2 and result.step == 6
  assert "checkpoint" in err and "4 does not restore" in err
  assert "warning: resuming with changed settings: steps 4 -> 6" in err
  names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  assert [n for n in names if n.isdigit()] == ["2", "4", "6"]
  assert next(n for n in names if not n.isdigit()).startswith("4.unusable-")
  assert [r["step"] for r in metrics.read_metrics(workdir / "metrics.jsonl")] == list(range(1, 7))
  assert "steps: 6" in (workdir / "config.yaml").read_text()


def test_resume_with_another_model_stops_before_restoring(base, finished, capsys):
  stored = (finished / "config.yaml").read_text()
  err = _one_line_exit_2(
    capsys, _args(base, finished, "steps=6", "model.d_model=64", "model.tie_embeddings=false")
  )
  assert err.startswith(
    "config error: the workdir's checkpoints were written with another "
    "model: model.d_model 32 -> 64, model.tie_embeddings True -> False"
  )
  assert (finished / "config.yaml").read_text() == stored


def test_run_with_nothing_to_train_keeps_config_yaml(base, finished):
  stored = (finished / "config.yaml").read_text()
  result = train_testing.train(_args(base, finished, "steps=3", "checkpoint_every=2"))
  assert result.start_step == 4 and result.step == 4
  assert (finished / "config.yaml").read_text() == stored


def test_stored_config_yaml_resumes_the_run(base, finished, capsys):
  cfg = trainer.with_vocab(
    config.load(None, _args(base, finished, *RUN_STEPS)), train_testing.VOCAB
  )
  assert config.load(finished / "config.yaml") == cfg
  assert cli.main([str(finished / "config.yaml")]) == 0
  assert "step 4: loss" in capsys.readouterr().out


def test_failing_evaluation_keeps_its_checkpoint(base, tmp_path, monkeypatch):
  def failing_evaluation(*args, **kwargs):
    raise config.ConfigError("the eval split is too small (simulated)")

  monkeypatch.setattr(trainer, "evaluate", failing_evaluation)
  workdir = tmp_path / "run"
  with pytest.raises(config.ConfigError, match="simulated"):
    train_testing.train(_args(base, workdir, *RUN_STEPS, "eval_every=2"))
  # Saved before the evaluation, and committed before the exception left the trainer.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
  assert (workdir / "checkpoints" / "2" / "state" / "commit_success.txt").is_file()
  assert not (workdir / LOCK_FILE).exists()
  monkeypatch.undo()
  result = train_testing.train(_args(base, workdir, *RUN_STEPS, "eval_every=2"))
  assert result.start_step == 2 and result.step == 4


def test_dropout_resume_is_exact(base, tmp_path, monkeypatch):
  args = [*RUN_STEPS, "model.dropout=0.3", "checkpoint_every=1000"]
  reference = train_testing.train(_args(base, tmp_path / "reference", *args))
  calls = []

  def stop_after_two(self):
    calls.append(1)
    return len(calls) >= 2

  monkeypatch.setattr(trainer._StopFlag, "agreed", stop_after_two)
  stopped = train_testing.train(_args(base, tmp_path / "resumed", *args))
  assert stopped.preempted and stopped.step == 2
  monkeypatch.undo()
  resumed = train_testing.train(_args(base, tmp_path / "resumed", *args))
  assert resumed.start_step == 2 and resumed.step == 4
  assert train_testing.losses(tmp_path / "resumed") == train_testing.losses(tmp_path / "reference")
  assert reference.step == 4
