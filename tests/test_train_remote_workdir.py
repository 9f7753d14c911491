"""Workdirs on Cloud Storage (gs://), against an in-memory fsspec filesystem standing in for GCS.

etils.epath opens gs:// paths with ``fsspec.filesystem("gcs", finalize_on_close=True)``; the
fixture registers an in-memory filesystem (its own store, refusing appends like GCS) for the
``gs``/``gcs`` protocols and undoes that afterwards. A whole trainer run on gs:// is not tested:
Orbax writes arrays through TensorStore's own GCS driver, which this cannot stand in for.
"""

from __future__ import annotations

import importlib
import json
from typing import ClassVar

import pytest
import yaml
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.utils import stringify_path

from train import checkpoint, config, metrics, paths, trainer
from train.metrics import MetricsWriter, read_metrics

RUN = "gs://bucket/run"


def _clear_epath_filesystems() -> None:
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture
def gcs(monkeypatch):
  """An empty in-memory Cloud Storage behind gs:// paths; its store (object name -> bytes)."""

  class InMemoryGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    # This class's own store (one per test), not MemoryFileSystem's global one.
    store: ClassVar[dict] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]

    def __init__(self, *args, finalize_on_close: bool = False, **kwargs):
      super().__init__(*args, **kwargs)
      self.finalize_on_close = finalize_on_close

    @classmethod
    def _strip_protocol(cls, path):
      path = stringify_path(path)
      for prefix in ("gs://", "gcs://"):
        path = path.removeprefix(prefix)
      return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode:
        raise NotImplementedError("Cloud Storage objects cannot be appended to")
      return super()._open(path, mode, **kwargs)

  registry = importlib.import_module("fsspec.registry")
  for protocol in ("gs", "gcs"):
    monkeypatch.setitem(registry._registry, protocol, InMemoryGCS)
  monkeypatch.setenv("EPATH_USE_TF", "false")  # fsspec backend even if TensorFlow is installed
  _clear_epath_filesystems()
  yield InMemoryGCS.store
  _clear_epath_filesystems()


def _object(store: dict, name: str) -> bytes:
  return store[f"/{name}"].getvalue()


def _steps() -> list[int]:
  """The steps in the stored gs://bucket/run/metrics.jsonl."""
  return [r["step"] for r in read_metrics(f"{RUN}/metrics.jsonl")]


def test_the_fixture_stands_in_for_gcs(gcs):
  path = epath.Path(RUN) / "probe.txt"
  path.write_text("hello")
  assert _object(gcs, "bucket/run/probe.txt") == b"hello"
  with pytest.raises(NotImplementedError, match="appended"):
    path.open("a")


def test_metrics_and_plot_on_gcs(gcs):
  writer = MetricsWriter(
    RUN, total_steps=4, start_step=0, enabled=True, progress=False, tensorboard=False
  )
  assert writer.remote
  for step in (1, 2, 3, 4):
    writer.write(step, {"loss": 5.0 - step, **({"eval_loss": 1.5} if step == 4 else {})})
  plot = writer.plot()
  writer.close()
  assert str(plot) == f"{RUN}/loss.png"
  assert _object(gcs, "bucket/run/loss.png").startswith(b"\x89PNG\r\n\x1a\n")
  lines = _object(gcs, "bucket/run/metrics.jsonl").decode().splitlines()
  assert [json.loads(line) for line in lines] == [
    {"step": 1, "loss": 4.0},
    {"step": 2, "loss": 3.0},
    {"step": 3, "loss": 2.0},
    {"step": 4, "loss": 1.0, "eval_loss": 1.5},
  ]
  assert [r["step"] for r in writer.history] == [1, 2, 3, 4]


def test_metrics_resume_on_gcs_drops_lines_past_the_checkpoint(gcs):
  lines = [{"step": s, "loss": 10.0 - s} for s in (1, 2, 3, 4)]
  epath.Path(RUN).mkdir(parents=True, exist_ok=True)
  (epath.Path(RUN) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  writer = MetricsWriter(
    RUN, total_steps=6, start_step=2, enabled=True, progress=False, tensorboard=False
  )
  assert _steps() == [1, 2]  # rewritten at once, before any new line
  writer.write(3, {"loss": 0.5})
  writer.close()
  assert [(r["step"], r["loss"]) for r in read_metrics(f"{RUN}/metrics.jsonl")] == [
    (1, 9.0),
    (2, 8.0),
    (3, 0.5),
  ]


def test_remote_metrics_are_rewritten_at_most_every_interval(gcs, monkeypatch):
  monkeypatch.setattr(metrics, "REMOTE_UPLOAD_INTERVAL_S", 3600.0)
  writer = MetricsWriter(
    RUN, total_steps=10, start_step=0, enabled=True, progress=False, tensorboard=False
  )
  writer.write(1, {"loss": 1.0})
  assert _steps() == [1]  # the first line goes up at once
  writer.write(2, {"loss": 1.0})
  writer.write(3, {"loss": 1.0})
  assert _steps() == [1]  # within the interval: not rewritten
  monkeypatch.setattr(metrics, "REMOTE_UPLOAD_INTERVAL_S", 0.0)
  writer.write(4, {"loss": 1.0})
  assert _steps() == [1, 2, 3, 4]  # interval over: everything so far
  monkeypatch.setattr(metrics, "REMOTE_UPLOAD_INTERVAL_S", 3600.0)
  writer.write(5, {"loss": 1.0})
  assert _steps() == [1, 2, 3, 4]
  writer.close()
  assert _steps() == [1, 2, 3, 4, 5]  # close() uploads the rest


def test_remote_metrics_throttle_follows_the_clock(gcs, monkeypatch):
  now = [1000.0]
  monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
  writer = MetricsWriter(
    RUN, total_steps=10, start_step=0, enabled=True, progress=False, tensorboard=False
  )
  writer.write(1, {"loss": 1.0})
  now[0] += metrics.REMOTE_UPLOAD_INTERVAL_S - 1
  writer.write(2, {"loss": 1.0})
  assert _steps() == [1]
  now[0] += 1
  writer.write(3, {"loss": 1.0})
  assert _steps() == [1, 2, 3]
  writer.close()


def test_local_metrics_are_still_appended_line_by_line(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics, "REMOTE_UPLOAD_INTERVAL_S", 3600.0)
  writer = MetricsWriter(
    tmp_path, total_steps=3, start_step=0, enabled=True, progress=False, tensorboard=False
  )
  assert not writer.remote
  writer.write(1, {"loss": 1.0})
  writer.write(2, {"loss": 0.5})
  assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]  # flushed
  assert writer.plot() == epath.Path(tmp_path) / "loss.png"
  assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
  writer.close()


def test_checkpoint_directory_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  assert str(checkpoint.checkpoint_directory(f"{RUN}/checkpoints")) == f"{RUN}/checkpoints"
  assert str(checkpoint.checkpoint_directory(epath.Path(RUN) / "checkpoints")) == (
    f"{RUN}/checkpoints"
  )
  monkeypatch.chdir(tmp_path)
  local = checkpoint.checkpoint_directory("runs/a/checkpoints")
  assert local.is_absolute()
  assert str(local) == str(tmp_path / "runs" / "a" / "checkpoints")
  assert str(checkpoint.checkpoint_directory("/abs/checkpoints")) == "/abs/checkpoints"


def test_trainer_workdir_keeps_gs_uris():
  workdir = paths.workdir_path(RUN)
  assert str(workdir) == RUN
  assert str(workdir / trainer.CHECKPOINT_DIR) == f"{RUN}/checkpoints"
  assert str(checkpoint.checkpoint_directory(workdir / trainer.CHECKPOINT_DIR)) == (
    f"{RUN}/checkpoints"
  )
  assert str(paths.workdir_path("runs/a")) == "runs/a"  # local: as given, relative
  with pytest.raises(config.ConfigError, match="workdir='gcs://bucket/run'"):
    paths.workdir_path("gcs://bucket/run")


def test_trainer_writes_config_yaml_to_gcs(gcs):
  cfg = config.load(None, [f"workdir={RUN}", "steps=3"])
  trainer.write_config(paths.workdir_path(cfg.workdir), cfg)
  written = yaml.safe_load(_object(gcs, "bucket/run/config.yaml"))
  assert written["workdir"] == RUN
  assert written["steps"] == 3


def test_workdir_lock_on_gcs(gcs, monkeypatch):
  from train import workdir_lock

  monkeypatch.setattr(workdir_lock, "URI_SETTLE_S", 0.0)
  run = epath.Path(RUN)
  run.mkdir(parents=True, exist_ok=True)
  first = workdir_lock.WorkdirLock(run, force=False, warn=print)
  first.acquire()
  holder = json.loads(_object(gcs, "bucket/run/run.lock"))
  # As if held from another host: a second run refuses, naming it; force_unlock takes over.
  (run / "run.lock").write_text(json.dumps({**holder, "host": "tpu-worker-0"}))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="host tpu-worker-0"):
    workdir_lock.WorkdirLock(run, force=False, warn=print).acquire()
  warnings = []
  with workdir_lock.WorkdirLock(run, force=True, warn=warnings.append) as second:
    assert json.loads(_object(gcs, "bucket/run/run.lock"))["token"] == second.holder.token
  assert "force_unlock=true" in warnings[0]
  assert not (run / "run.lock").exists()
