"""Orbax checkpoints of the train state and the Grain iterator.

Layout of ``<workdir>/checkpoints/<step>/``:

* ``state/``: the :class:`train.step.TrainState` (step, parameters, optimizer state, RNG key
  data) through Orbax's ``StandardSave`` (one OCDBT/Zarr store; every host writes its shards);
* ``data/``: the Grain iterator state, one ``process_<i>-of-<n>.json`` per host (Grain's own
  Orbax handler).

Saves are asynchronous: the arrays are copied to host memory before ``save`` returns (so the
donated state can be overwritten by the next step) and written to disk in the background; a
checkpoint becomes visible only when complete (Orbax writes to a temporary directory and renames
it), so a run killed mid-write resumes from the previous one. The Grain handler is synchronous:
the iterator state recorded is the one at the saved step.

Resuming takes the newest checkpoint that restores (:meth:`Checkpointer.restore_newest`): a
damaged one (a missing or garbled state file or chunk, a garbled or missing iterator file, an
empty step directory) is skipped with a warning and moved aside to ``<step>.unusable-<time>``,
which Orbax does not read as a step (so it neither blocks the save of that step again nor counts
towards ``keep``). Only when no checkpoint restores does the run stop, naming the directory.

The directory may be a Cloud Storage URI (``gs://bucket/run/checkpoints``): Orbax writes the
arrays through TensorStore's own GCS driver and the rest through ``etils.epath`` (``gcsfs``,
in the ``gcp`` extra).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath

from train import paths
from train.errors import RunError


def checkpoint_directory(directory: str | os.PathLike) -> epath.Path:
  """``directory`` for Orbax: a URI (``gs://...``) as it is, a local path made absolute."""
  path = epath.Path(directory)
  if paths.is_uri(path):
    return path  # epath's absolute() would make gs://b/x a local ./gs:/b/x
  return path.absolute()


class CheckpointError(RunError):
  """The checkpoint directory holds checkpoints, but none of them restores."""


def _reason(error: BaseException, limit: int = 200) -> str:
  """The first line of ``error``'s message (TensorStore's run to pages), at most ``limit``."""
  text = (str(error).strip().splitlines() or [""])[0]
  text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."


class Checkpointer:
  """Saves when asked (the trainer decides when), keeps the last ``keep``.

  Args:
    directory: where the step directories go (created if missing): local or ``gs://...``.
    keep: how many checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=True
    )
    self.directory = checkpoint_directory(directory)
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data")
    )

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    """Starts saving ``state`` and the iterator's state at ``step`` (asynchronously)."""
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
      ),
      force=True,
    )

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """The state saved at ``step``, placed on ``abstract_state``'s shardings.

    Args:
      step: a step with a complete checkpoint.
      abstract_state: the state's ShapeDtypeStructs carrying the current mesh's shardings.
      data_iterator: the Grain iterator; its state is set to the saved one in place.
    """
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
      ),
    )
    return restored.state

  def restore_newest(
    self, abstract_state: Any, data_iterator: Any, *, warn: Callable[[str], None], set_aside: bool
  ) -> tuple[int, Any]:
    """The newest checkpoint that restores: ``(step, state)``, or ``(0, None)`` if none exists.

    Each newer checkpoint that fails to restore is reported through ``warn`` (its step and
    why) and, with ``set_aside`` (process 0 only), renamed to ``<step>.unusable-<time>``.

    Args:
      abstract_state: as for :meth:`restore`.
      data_iterator: as for :meth:`restore`; set to the restored checkpoint's position.
      warn: called with one line per skipped checkpoint.
      set_aside: rename the skipped step directories (the caller syncs hosts afterwards).

    Raises:
      CheckpointError: there are checkpoints, but none restores (the message names the
        directory and the newest one's reason).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures: list[tuple[int, str]] = []
    for step in steps:
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except Exception as error:
        failures.append((step, _reason(error)))
        warn(
          f"warning: checkpoint {self.directory / str(step)} does not restore "
          f"({failures[-1][1]}); skipping it"
        )
        continue
      if failures and set_aside:
        self._set_aside([failed for failed, _ in failures], warn)
      return step, state
    if failures:
      newest, reason = failures[0]
      raise CheckpointError(
        f"no checkpoint in {self.directory} restores (steps {steps}; step {newest}: "
        f"{reason}); move that directory away to start the run afresh"
      )
    return 0, None

  def _set_aside(self, steps: list[int], warn: Callable[[str], None]) -> None:
    """Renames the step directories ``steps`` to ``<step>.unusable-<unix time>``."""
    stamp = int(time.time())
    for step in steps:
      source = self.directory / str(step)
      target = self.directory / f"{step}.unusable-{stamp}"
      try:
        source.rename(target)
      except OSError as error:
        warn(f"warning: could not move {source} aside ({error}); remove it by hand")
      else:
        warn(f"warning: moved the unusable checkpoint {source} to {target.name}")

  def reload(self) -> None:
    """Re-reads the step directories (after another process moved some aside)."""
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
