"""One run per workdir: a lock file ``<workdir>/run.lock`` held for the whole run.

The lock file is a JSON object naming its holder: ``host``, ``pid``, ``started`` (UTC, ISO
8601) and a random ``token``. Taking the lock:

* on a local or shared file system, the file is created with ``O_CREAT | O_EXCL``, which is
  atomic (also on NFS v3 and later), so of two trainers starting at once exactly one wins;
* on a URI (``gs://bucket/run``) there is no exclusive create through ``etils.epath``: the file
  is written, read back after :data:`URI_SETTLE_S` seconds, and the lock is ours only if it
  still holds our token (Cloud Storage reads are strongly consistent; two trainers starting
  within the same second may both see the other's token and both refuse, never both run).

A lock whose holder is gone is taken over with a warning when the holder ran on this host and
its pid no longer exists (a killed run). Any other existing lock refuses the run, naming its
holder, unless ``force`` (the config's ``force_unlock=true``) is set. Only process 0 of a
multi-host run takes the lock (the trainer does that).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import time
import uuid
from collections.abc import Callable

from etils import epath

from train import paths
from train.errors import RunError

LOCK_FILE = "run.lock"
# Seconds between writing a URI lock file and reading it back to confirm it is ours.
URI_SETTLE_S = 1.0


class WorkdirLockedError(RunError):
  """Another run holds the workdir's lock (the message names it and the way out)."""


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a lock: host name, process id, start time (ISO 8601, UTC) and a random token."""

  host: str
  pid: int
  started: str
  token: str

  @classmethod
  def this_process(cls) -> Holder:
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return cls(host=socket.gethostname(), pid=os.getpid(), started=started, token=uuid.uuid4().hex)

  def describe(self) -> str:
    return f"host {self.host}, pid {self.pid}, started {self.started}"

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> Holder | None:
    """The holder in a lock file's text; None if it is not one (torn or garbled)."""
    try:
      fields = json.loads(text)
      return cls(
        host=str(fields["host"]),
        pid=int(fields["pid"]),
        started=str(fields["started"]),
        token=str(fields["token"]),
      )
    except (ValueError, TypeError, KeyError):
      return None


def _pid_exists(pid: int) -> bool:
  """Whether process ``pid`` exists on this host."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


class WorkdirLock:
  """The lock of ``workdir`` (not taken until :meth:`acquire`).

  Args:
    workdir: the run's directory (local, shared, or a URI); must exist.
    force: take the lock even when a live or remote holder has it (``force_unlock=true``).
    warn: where the one-line warnings go (a stale lock taken over, a forced unlock).
  """

  def __init__(self, workdir: epath.Path, *, force: bool, warn: Callable[[str], None]):
    self.path = epath.Path(workdir) / LOCK_FILE
    self.force = force
    self.warn = warn
    self.holder = Holder.this_process()
    self.held = False

  def acquire(self) -> None:
    """Takes the lock.

    Raises:
      WorkdirLockedError: another run holds it (names the holder and ``force_unlock=true``).
    """
    for _ in range(3):  # a stale lock removed by us may be retaken by a racer first
      if self._create():
        self.held = True
        return
      current = self._read()
      if current is not None and current.token == self.holder.token:
        self.held = True
        return
      if current is None and not self.path.exists():
        continue  # released in between
      if not self._may_take_over(current):
        break
      self._remove()
    who = current.describe() if current is not None else "an unreadable lock file"
    raise WorkdirLockedError(
      f"workdir {self.path.parent} is in use by another run ({who}; lock file {self.path}); "
      "wait for it to end, use another workdir, or pass force_unlock=true if that run is "
      "gone"
    )

  def release(self) -> None:
    """Removes the lock file if it is still ours (no-op when not held)."""
    if not self.held:
      return
    self.held = False
    current = self._read()
    if current is not None and current.token == self.holder.token:
      self._remove()

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def _may_take_over(self, current: Holder | None) -> bool:
    same_host = current is not None and current.host == self.holder.host
    if same_host and (current.pid == self.holder.pid or not _pid_exists(current.pid)):
      self.warn(
        f"warning: taking over the lock of a run that is gone ({current.describe()}; {self.path})"
      )
      return True
    if self.force:
      who = current.describe() if current is not None else "unreadable"
      self.warn(f"warning: force_unlock=true: taking over the lock {self.path} ({who})")
      return True
    return False

  def _create(self) -> bool:
    """Writes our lock file if none exists; whether we did."""
    text = self.holder.to_json()
    if paths.is_uri(self.path):
      if self.path.exists():
        return False
      self.path.write_text(text)
      time.sleep(URI_SETTLE_S)
      current = self._read()
      return current is not None and current.token == self.holder.token
    try:
      descriptor = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(descriptor, "w") as file:
      file.write(text)
    return True

  def _read(self) -> Holder | None:
    try:
      return Holder.from_json(self.path.read_text())
    except (FileNotFoundError, OSError):
      return None

  def _remove(self) -> None:
    with contextlib.suppress(FileNotFoundError):
      self.path.unlink()
