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

The directory may be a Cloud Storage URI (``gs://bucket/run/checkpoints``): Orbax writes the
arrays through TensorStore's own GCS driver and the rest through ``etils.epath`` (``gcsfs``,
in the ``gcp`` extra).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from etils import epath

from train import paths


def checkpoint_directory(directory: str | os.PathLike) -> epath.Path:
  """``directory`` for Orbax: a URI (``gs://...``) as it is, a local path made absolute."""
  path = epath.Path(directory)
  if paths.is_uri(path):
    return path  # epath's absolute() would make gs://b/x a local ./gs:/b/x
  return path.absolute()


class Checkpointer:
  """Saves when asked (the trainer decides when), keeps the last ``keep``.

  Args:
    directory: where the step directories go (created if missing): local or ``gs://...``.
    keep: how many checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(
        checkpoint_directory(directory), options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    """Starts saving ``state`` and the iterator's state at ``step`` (asynchronously)."""
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)),
        force=True)

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
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.state

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
