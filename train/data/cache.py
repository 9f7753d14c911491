"""Build-once cache entries: a directory per key, built in a temporary directory and renamed.

Concurrent callers (several processes of one job on one machine, or hosts sharing a POSIX file
system with working ``flock``) take an exclusive lock per entry; the first builds, the others wait
and find the finished entry. An entry appears only complete (one ``rename`` of the whole
directory), so a reader that takes no lock never sees a half-written file, and a build that
dies leaves only a ``.tmp-*`` directory behind.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator

# Bumped when the format of the cached files changes, so old entries are not reused.
FORMAT_VERSION = 1
# Builds done by this process, by kind: lets tests tell a cache hit from a rebuild.
BUILD_COUNTS: collections.Counter[str] = collections.Counter()
_COMPLETE = "entry.json"


def key_of(description: dict) -> str:
  """A short hash of ``description`` (JSON-serializable): the cache key of what it determines."""
  text = json.dumps({"format": FORMAT_VERSION, **description}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(lock_path: pathlib.Path) -> Iterator[None]:
  with open(lock_path, "a") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)


def read_entry(entry: pathlib.Path) -> dict | None:
  """The metadata of a finished entry, None when there is none."""
  try:
    return json.loads((entry / _COMPLETE).read_text())
  except FileNotFoundError:
    return None


def build_once(
  cache_dir: pathlib.Path, kind: str, description: dict, build: Callable[[pathlib.Path], dict]
) -> tuple[pathlib.Path, dict]:
  """The entry ``<cache_dir>/<kind>-<key_of(description)>``, built by ``build`` if missing.

  ``build(tmp_dir)`` writes its files into ``tmp_dir`` and returns JSON-serializable metadata;
  it runs at most once per key across concurrent callers. Returns the entry directory and that
  metadata (read back from the entry, so a cache hit returns the same as the build).
  """
  cache_dir.mkdir(parents=True, exist_ok=True)
  entry = cache_dir / f"{kind}-{key_of(description)}"
  meta = read_entry(entry)
  if meta is not None:
    return entry, meta
  with _locked(cache_dir / f".{entry.name}.lock"):
    meta = read_entry(entry)  # Another process may have built it while we waited.
    if meta is not None:
      return entry, meta
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=cache_dir))
    try:
      meta = build(tmp)
      (tmp / _COMPLETE).write_text(json.dumps({"description": description, **meta}, indent=2))
      if entry.exists():  # Left by something that was not this code: no entry.json inside.
        shutil.rmtree(entry)
      os.rename(tmp, entry)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    BUILD_COUNTS[kind] += 1
  meta = read_entry(entry)
  assert meta is not None
  return entry, meta
