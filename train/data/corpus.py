"""Finding the text: the standard library's source files or the user's files, read under a byte cap.

A corpus is an ordered list of files; each file is one document. Reading walks the files in
order and, given ``max_bytes``, stops after that many bytes (the last file read is cut there);
``max_bytes=None`` reads every file whole. Documents are yielded
in pieces of about ``CHUNK_BYTES`` cut at line ends, so memory stays bounded however big a file is.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pathlib
import sys
import sysconfig
from collections.abc import Iterator, Sequence

CHUNK_BYTES = 1 << 20
# Directories under the stdlib path that hold installed packages, not the standard library.
_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_files() -> list[pathlib.Path]:
  """The standard library's *.py files, sorted by path relative to the stdlib directory.

  Installed packages (site-packages, dist-packages) are left out, so the list depends on the
  Python version only.
  """
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = [
    f
    for f in root.rglob("*.py")
    if f.is_file() and not _NOT_STDLIB.intersection(f.relative_to(root).parts)
  ]
  return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def text_files(paths: Sequence[str]) -> list[pathlib.Path]:
  """Expands ``paths`` (files, directories, globs with "**") in order, each match sorted.

  A directory stands for every file below it. Files met twice are kept once (first place).

  Raises:
    ValueError naming ``paths`` for an entry that matches no file.
  """
  files: list[pathlib.Path] = []
  seen: set[pathlib.Path] = set()
  for entry in paths:
    entry = os.path.expanduser(entry)
    matches = sorted(glob.glob(entry, recursive=True)) if glob.has_magic(entry) else [entry]
    found = []
    for match in map(pathlib.Path, matches):
      if match.is_dir():
        found.extend(sorted(f for f in match.rglob("*") if f.is_file()))
      elif match.is_file():
        found.append(match)
    if not found:
      raise ValueError(f"DataConfig.paths entry {entry!r} matches no file")
    for f in found:
      key = f.resolve()
      if key not in seen:
        seen.add(key)
        files.append(f)
  return files


def _pieces(path: pathlib.Path, budget: int) -> Iterator[bytes]:
  """The first ``budget`` bytes of ``path``, in pieces of about CHUNK_BYTES ending at a newline."""
  with open(path, "rb") as f:
    while budget > 0:
      piece = f.read(min(CHUNK_BYTES, budget))
      if not piece:
        return
      if len(piece) < budget and not piece.endswith(b"\n"):
        piece += f.readline(budget - len(piece))
      budget -= len(piece)
      yield piece


def _budget(max_bytes: int | None) -> int:
  return sys.maxsize if max_bytes is None else max_bytes


def iter_documents(
  files: Sequence[pathlib.Path], max_bytes: int | None
) -> Iterator[tuple[str, bool]]:
  """Yields ``(text, ends_document)`` pieces of the files in order, ``max_bytes`` bytes in all
  (None: no cap).

  Text is decoded as UTF-8 with undecodable bytes replaced (U+FFFD). ``ends_document`` is True
  on the last piece of each file (also for the file cut by the cap). Empty files yield nothing.
  """
  left = _budget(max_bytes)
  for path in files:
    if left <= 0:
      return
    piece = None
    for following in _pieces(path, left):
      if piece is not None:
        yield piece.decode("utf-8", errors="replace"), False
      left -= len(following)
      piece = following
    if piece is not None:
      yield piece.decode("utf-8", errors="replace"), True


def fingerprint(files: Sequence[pathlib.Path], max_bytes: int | None) -> str:
  """sha256 hex over the bytes ``iter_documents`` reads: each file's size and content hash, in
  order.

  Depends on content only (not on absolute paths or mtimes), so hosts holding the same text
  agree on it.
  """
  digest = hashlib.sha256(f"max_bytes={max_bytes}\n".encode())
  left = _budget(max_bytes)
  for path in files:
    if left <= 0:
      break
    file_digest = hashlib.sha256()
    size = 0
    for piece in _pieces(path, left):
      size += len(piece)
      file_digest.update(piece)
    left -= size
    digest.update(f"{size} {file_digest.hexdigest()}\n".encode())
  return digest.hexdigest()
