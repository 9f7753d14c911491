"""Where the metrics go: a progress bar, ``metrics.jsonl``, TensorBoard, and a final plot.

Only the writer of process 0 writes files; the others are silent. ``metrics.jsonl`` holds one
JSON object per logged step, with at least ``step`` and ``loss`` (the training loss of that
step) and, at evaluation steps, ``eval_loss``, ``eval_accuracy`` and ``eval_entropy``
(TensorBoard tags ``eval/loss``, ``eval/accuracy``, ``eval/entropy``). When a run resumes
from step s, lines past s (logged after the checkpoint the run resumes from) are dropped, and
TensorBoard's events past s are purged, so the files read as one uninterrupted run.

The workdir may be local or a Cloud Storage URI (``gs://bucket/run``, through ``etils.epath``;
needs the ``gcp`` extra: ``gcsfs`` for the files, ``google-cloud-storage`` for TensorBoard,
which writes there itself). A local ``metrics.jsonl`` is appended to and flushed at every line.
A Cloud Storage object cannot be appended to, so a remote one is rewritten whole: at the first
line, then at most every :data:`REMOTE_UPLOAD_INTERVAL_S` seconds, and at :meth:`close`
(lines logged in between reach it later, and a killed run loses at most that interval's lines,
which its resumed run logs again).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import tqdm
from etils import epath

from train import paths
from train import progress as _progress  # `progress` is an argument below
from train.errors import RunError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
# The shortest time (seconds) between two rewrites of a remote (gs://) metrics.jsonl.
REMOTE_UPLOAD_INTERVAL_S = 30.0


class MetricsFileError(RunError):
  """A ``metrics.jsonl`` line before the last that is not a JSON object (names file and line)."""


def read_metrics(
  path: str | os.PathLike, warn: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl`` (local or ``gs://``), in order; [] if it is missing.

  A torn last line (a crash mid-write) is dropped, through ``warn`` if given.

  Raises:
    MetricsFileError: any other line that is not a JSON object with a ``step``; the message
      names the file and the line number.
  """
  path = epath.Path(path)
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError("not a JSON object with an integer step")
    except ValueError as error:
      if i == last:
        if warn is not None:
          warn(f"warning: {path}: dropped the torn last line {i + 1} ({line[:60]!r})")
        break
      raise MetricsFileError(
        f"{path}, line {i + 1}: not a metrics record ({error}); fix or delete that line"
      ) from None
    records.append(record)
  return records


def _jsonl(records: list[dict[str, Any]]) -> str:
  return "".join(json.dumps(r) + "\n" for r in records)


class MetricsWriter:
  """Console progress, JSONL, TensorBoard and a loss plot for one run.

  Args:
    workdir: the run's directory: a local path or a URI such as ``gs://bucket/run``.
    total_steps: the run's last step.
    start_step: the step the run starts (or resumes) from.
    enabled: write files (True on process 0 only).
    progress: show a tqdm progress bar (with ETA) when stdout and stderr are terminals; else
      (also with progress False) print one plain line per logged step (train/progress.py).
    tensorboard: write TensorBoard event files under ``workdir/tensorboard``.
    warn: where a warning about the existing ``metrics.jsonl`` goes (a torn last line).

  Raises:
    MetricsFileError: an existing ``metrics.jsonl`` with a bad line before its last.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    total_steps: int,
    start_step: int,
    enabled: bool,
    progress: bool,
    tensorboard: bool,
    warn: Callable[[str], None] | None = None,
  ):
    self.workdir = epath.Path(workdir)
    # A URI (gs://...) cannot be appended to: metrics.jsonl is rewritten whole, now and then.
    self.remote = paths.is_uri(self.workdir)
    self.enabled = enabled
    self.path = self.workdir / METRICS_FILE
    self.history: list[dict[str, Any]] = []
    self._jsonl = None
    self._tensorboard = None
    self._uploaded_at: float | None = None  # remote: time.monotonic() of the last rewrite
    self._unsaved = False  # remote: lines logged since the last rewrite
    if enabled:
      self.workdir.mkdir(parents=True, exist_ok=True)
      kept = [r for r in read_metrics(self.path, warn) if r["step"] <= start_step]
      self.path.write_text(_jsonl(kept))
      self.history = kept
      if not self.remote:
        self._jsonl = self.path.open("a")
      if tensorboard:
        import tensorboardX  # imported here: process 0 only

        self._tensorboard = tensorboardX.SummaryWriter(
          os.fspath(self.workdir / TENSORBOARD_DIR),
          purge_step=start_step + 1 if start_step else None,
        )
    self.total_steps = total_steps
    show_bar = enabled and progress and _progress.is_terminal()
    # Not a terminal (a pod's log file) or no bar wanted: one plain line per logged step.
    self._plain_lines = enabled and not show_bar
    self.bar = tqdm.tqdm(
      total=total_steps, initial=start_step, unit="step", disable=not show_bar, dynamic_ncols=True
    )

  def advance(self, steps: int = 1) -> None:
    """Moves the progress bar (its ETA comes from the observed step rate)."""
    self.bar.update(steps)

  def write(self, step: int, values: dict[str, float]) -> None:
    """Records ``values`` (which must include ``loss``) for ``step`` everywhere."""
    record = {"step": step, **{k: float(v) for k, v in values.items()}}
    self.history.append(record)
    if not self.enabled:
      return
    if self.remote:
      self._unsaved = True
      now = time.monotonic()
      if self._uploaded_at is None or now - self._uploaded_at >= REMOTE_UPLOAD_INTERVAL_S:
        self._upload()
    else:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    if self._tensorboard is not None:
      for name, value in values.items():
        tag = f"eval/{name[5:]}" if name.startswith("eval_") else f"train/{name}"
        self._tensorboard.add_scalar(tag, value, step)
      self._tensorboard.flush()
    shown = {"loss": f"{record['loss']:.4f}"}
    if "eval_loss" in record:
      shown["eval"] = f"{record['eval_loss']:.4f}"
    self.bar.set_postfix(shown, refresh=False)
    if self._plain_lines:
      print(_progress.format_line(step, self.total_steps, record), flush=True)

  def message(self, text: str) -> None:
    """A line on the console of process 0 that does not break the progress bar."""
    if self.enabled:
      tqdm.tqdm.write(text)

  def _upload(self) -> None:
    """Rewrites the remote ``metrics.jsonl`` with the whole history."""
    self.path.write_text(_jsonl(self.history))
    self._uploaded_at = time.monotonic()
    self._unsaved = False

  def plot(self) -> epath.Path | None:
    """Draws train and eval loss against step into ``workdir/loss.png``; its path."""
    if not self.enabled or not self.history:
      return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in self.history if math.isfinite(r["loss"])]
    evals = [(r["step"], r["eval_loss"]) for r in self.history if "eval_loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    if train:
      axes.plot(*zip(*train, strict=True), label="train loss")
    if evals:
      axes.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    image = io.BytesIO()  # written through epath: a local file or a gs:// object alike
    figure.savefig(image, format="png", dpi=120)
    plt.close(figure)
    path = self.workdir / PLOT_FILE
    path.write_bytes(image.getvalue())
    return path

  def close(self) -> None:
    """Closes the progress bar and the files; a remote ``metrics.jsonl`` gets its last lines."""
    self.bar.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self.enabled and self.remote and self._unsaved:
      self._upload()
    if self._tensorboard is not None:
      self._tensorboard.close()
