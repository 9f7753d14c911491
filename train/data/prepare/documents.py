"""Reading the documents of text files, JSONL and Parquet in units a worker encodes on its own.

A *unit* is a piece of the input that becomes one shard: a group of whole text files (each file
one document), a byte range of a JSONL file cut at line ends (each line one document, its
`field` the text), or one row group of a Parquet file (each row one document, its `field`
column the text). Inputs may be local paths or URLs (`gs://...`, through fsspec as
`etils.epath` opens them); Parquet needs `pyarrow` (the `data` extra).
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
from collections.abc import Iterator, Sequence

from train.data.shards import is_url

FORMATS = ("text", "jsonl", "parquet")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}


@dataclasses.dataclass(frozen=True)
class Unit:
  """One shard's worth of input: `files` (text), or `files[0]` with a byte range (jsonl,
  `[start, stop)`) or a row group (parquet, `start`)."""

  index: int
  format: str
  files: tuple[str, ...]
  start: int = 0
  stop: int = 0


def _open(path: str, mode: str = "rb"):
  if is_url(path):
    import fsspec

    return fsspec.open(path, mode).open()
  return open(path, mode)


def _size(path: str) -> int:
  if is_url(path):
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path)
    return int(fs.size(inner))
  return os.path.getsize(path)


def expand_inputs(patterns: Sequence[str]) -> list[str]:
  """The files `patterns` (files, directories, globs with "**"; local or URLs) name, in order.

  Raises:
    ValueError naming `paths` for a pattern that matches no file.
  """
  found: list[str] = []
  for pattern in patterns:
    if is_url(pattern):
      import fsspec

      fs, inner = fsspec.core.url_to_fs(pattern)
      scheme = pattern.split("://", 1)[0]
      if glob.has_magic(inner):
        names = sorted(fs.glob(inner))
      elif fs.isdir(inner):
        names = sorted(fs.find(inner))
      else:
        names = [inner] if fs.isfile(inner) else []
      matches = [f"{scheme}://{fs._strip_protocol(n).lstrip('/')}" for n in names if fs.isfile(n)]
    else:
      local = os.path.expanduser(pattern)
      if glob.has_magic(local):
        names = sorted(glob.glob(local, recursive=True))
      elif os.path.isdir(local):
        names = sorted(os.path.join(root, f) for root, _, files in os.walk(local) for f in files)
      else:
        names = [local]
      matches = [n for n in names if os.path.isfile(n)]
    if not matches:
      raise ValueError(f"paths entry {pattern!r} matches no file")
    found.extend(m for m in matches if m not in found)
  return found


def format_of(path: str, given: str | None) -> str:
  """`given`, else the format the file's suffix says (.jsonl, .parquet; text otherwise)."""
  if given is not None:
    return given
  return _SUFFIX_FORMATS.get(os.path.splitext(path)[1].lower(), "text")


def _jsonl_ranges(path: str, unit_bytes: int) -> list[tuple[int, int]]:
  """Byte ranges of about `unit_bytes` covering the file, each ending after a newline."""
  size = _size(path)
  ranges, start = [], 0
  with _open(path) as f:
    while start < size:
      stop = min(start + unit_bytes, size)
      if stop < size:
        f.seek(stop)
        stop += len(f.readline())
      ranges.append((start, stop))
      start = stop
  return ranges


def _parquet_row_groups(path: str) -> int:
  with _open(path) as f:
    return _parquet().ParquetFile(f).metadata.num_row_groups


def _parquet():
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ValueError(
      "format=parquet needs pyarrow: pip install 'cce-jax[data]' (or pip install pyarrow)"
    ) from None
  return pq


def plan(files: Sequence[str], format: str | None, unit_bytes: int) -> list[Unit]:
  """The units of `files`, in order: text files grouped to about `unit_bytes` each (a larger
  file is a unit of its own), JSONL files cut into ranges of about `unit_bytes`, Parquet files
  by row group."""
  units: list[Unit] = []
  group: list[str] = []
  group_bytes = 0

  def flush_group() -> None:
    nonlocal group, group_bytes
    if group:
      units.append(Unit(len(units), "text", tuple(group)))
      group, group_bytes = [], 0

  for path in files:
    kind = format_of(path, format)
    if kind == "text":
      size = _size(path)
      if group and group_bytes + size > unit_bytes:
        flush_group()
      group.append(path)
      group_bytes += size
      continue
    flush_group()
    base = len(units)
    if kind == "jsonl":
      units.extend(
        Unit(base + i, "jsonl", (path,), start, stop)
        for i, (start, stop) in enumerate(_jsonl_ranges(path, unit_bytes))
      )
    else:
      units.extend(Unit(base + i, "parquet", (path,), i) for i in range(_parquet_row_groups(path)))
  flush_group()
  return units


def documents(unit: Unit, field: str) -> Iterator[str]:
  """The texts of the documents of `unit`, in order.

  Raises:
    ValueError naming `field` for a JSON line or Parquet file without that text field, and
    naming the file and line for a line that is not JSON.
  """
  if unit.format == "text":
    for path in unit.files:
      with _open(path) as f:
        yield f.read().decode("utf-8", errors="replace")
  elif unit.format == "jsonl":
    path = unit.files[0]
    with _open(path) as f:
      f.seek(unit.start)
      data = f.read(unit.stop - unit.start)
    for number, line in enumerate(io.BytesIO(data), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(
          f"{path} (bytes {unit.start}-, line {number} of the range): not JSON ({error})"
        ) from None
      text = record.get(field) if isinstance(record, dict) else None
      if not isinstance(text, str):
        raise ValueError(
          f"field={field!r}: {path} has a line without a string {field!r} "
          f"(keys: {sorted(record) if isinstance(record, dict) else record!r})"
        )
      yield text
  else:
    path = unit.files[0]
    with _open(path) as f:
      table = _parquet().ParquetFile(f)
      if field not in table.schema_arrow.names:
        raise ValueError(
          f"field={field!r}: {path} has no column {field!r} (columns: {table.schema_arrow.names})"
        )
      column = table.read_row_group(unit.start, columns=[field]).column(0)
      for text in column.to_pylist():
        if text is not None:
          yield text
