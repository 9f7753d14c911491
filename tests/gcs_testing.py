"""An in-memory Cloud Storage for tests: gs:// paths served by an fsspec memory file system.

`install()` registers `CountingGCS` for the `gs`/`gcs` protocols (what `fsspec` and
`etils.epath` open gs:// URLs with); it counts the bytes each object hands out, so a test can
tell which objects and how much of them a process read. `python tests/gcs_testing.py SRC
gs://bucket/dir COUNTS -- ARGS...` runs `python -m train ARGS` in this process with the files
of local directory SRC uploaded to gs://bucket/dir first (not counted) and writes the bytes read
per object and every ranged read to the JSON file COUNTS at exit: a stand-in for a host of a
multi-host job reading its data from a bucket.
"""

from __future__ import annotations

import atexit
import collections
import importlib
import json
import os
import pathlib
import sys
from typing import ClassVar

from fsspec.implementations.memory import MemoryFileSystem
from fsspec.utils import stringify_path


class CountingGCS(MemoryFileSystem):
  """A memory file system behind gs:// that counts the bytes read of each object."""

  protocol = ("gs", "gcs")
  store: ClassVar[dict] = {}
  pseudo_dirs: ClassVar[list[str]] = [""]
  # Object name ("/bucket/dir/file") -> bytes handed out by cat_file and open().read().
  bytes_read: ClassVar[collections.Counter] = collections.Counter()
  # Every cat_file read: [object name, first byte, end byte].
  reads: ClassVar[list] = []

  @classmethod
  def _strip_protocol(cls, path):
    path = stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return super()._strip_protocol(path)

  def cat_file(self, path, start=None, end=None, **kwargs):
    data = super().cat_file(path, start=start, end=end, **kwargs)
    name = self._strip_protocol(path)
    type(self).bytes_read[name] += len(data)
    type(self).reads.append([name, start or 0, (start or 0) + len(data)])
    return data

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError("Cloud Storage objects cannot be appended to")
    handle = super()._open(path, mode, **kwargs)
    if "r" in mode:
      name, read, counts = self._strip_protocol(path), handle.read, type(self).bytes_read

      def counted_read(*args):
        data = read(*args)
        counts[name] += len(data)
        return data

      handle.read = counted_read
    return handle


def clear_epath_filesystems() -> None:
  """Forgets the file systems etils.epath cached, so it opens the registered one."""
  from etils.epath import backend as epath_backend

  epath_backend.fsspec_backend._get_filesystem.cache_clear()


def install(setitem=None) -> type[CountingGCS]:
  """Registers a fresh, empty `CountingGCS` for gs:// and gcs:// (its class, for the store).

  `setitem(mapping, key, value)` does the registering (pass `monkeypatch.setitem` to undo it
  after the test); default: plain assignment.
  """
  registry = importlib.import_module("fsspec.registry")
  setitem = setitem or (lambda mapping, key, value: mapping.__setitem__(key, value))

  class FreshGCS(CountingGCS):
    store: ClassVar[dict] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    bytes_read: ClassVar[collections.Counter] = collections.Counter()
    reads: ClassVar[list] = []

  for protocol in ("gs", "gcs"):
    setitem(registry._registry, protocol, FreshGCS)
  os.environ["EPATH_USE_TF"] = "false"
  clear_epath_filesystems()
  return FreshGCS


def upload(directory: pathlib.Path, url: str) -> None:
  """Copies every file of local `directory` to `url`/<name> (its bytes are not counted)."""
  import fsspec

  fs, root = fsspec.core.url_to_fs(url)
  for path in sorted(directory.iterdir()):
    if path.is_file():
      fs.pipe_file(f"{root}/{path.name}", path.read_bytes())


def _main(argv: list[str]) -> int:
  source, url, counts_path, separator, *train_args = argv
  assert separator == "--", argv
  gcs = install()
  upload(pathlib.Path(source), url)
  gcs.bytes_read.clear()
  gcs.reads.clear()
  atexit.register(
    lambda: pathlib.Path(counts_path).write_text(
      json.dumps({"bytes_read": gcs.bytes_read, "reads": gcs.reads})
    )
  )
  from train import cli

  return cli.main(train_args)


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
