"""Token shards read lazily: many `.npy` or raw `.bin` files, local or behind a URL (`gs://`).

A corpus is an ordered list of shards, each a 1-D run of integer token ids: a `.npy` file (its
header gives the dtype and length) or a raw `.bin` file of little-endian `uint16` or `uint32`
ids (no header; the length is the file size over the item size). The shards joined in order
are one token stream; a `TokenSplit` is a range `[start, stop)` of that stream.

Opening a corpus reads only each shard's header (`.npy`) or size (`.bin`), never its tokens.
`TokenSplit.read(start, count)` then reads exactly the bytes of those tokens: local files with
`os.pread`, URLs with ranged reads through `fsspec` (the library `etils.epath` opens `gs://`,
`s3://`, ... with; Cloud Storage needs `gcsfs`, the `gcp` extra). So a host that serves a few
rows of every batch reads those rows and nothing else.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import io
import os
from collections.abc import Sequence

import numpy as np

# Token dtypes a raw `.bin` shard may hold (little-endian).
BIN_DTYPES = ("uint16", "uint32")
SUFFIXES = (".npy", ".bin")
# Bytes read first from a `.npy` shard: its magic and a version 1 header fit in that.
_HEADER_PROBE = 256
# Shards whose headers are read at once when opening a corpus on a remote file system.
_OPEN_THREADS = 16


def is_url(path: str) -> bool:
  """Whether `path` is a URL such as `gs://bucket/shards` rather than a local path."""
  return "://" in path


def _filesystem(url: str):
  """(fsspec file system, path inside it) of a URL."""
  import fsspec  # Imported here: local corpora need no fsspec.

  try:
    return fsspec.core.url_to_fs(url)
  except (ImportError, ValueError) as error:
    raise ValueError(
      f"cannot open {url!r}: {error} (Cloud Storage needs gcsfs: pip install 'cce-jax[gcp]')"
    ) from None


def _url(fs, path: str, like: str) -> str:
  """The URL of `path` (as `fs.glob` returns it) in the scheme of `like`."""
  scheme = like.split("://", 1)[0]
  return f"{scheme}://{fs._strip_protocol(path).lstrip('/')}"


def expand(patterns: Sequence[str], field: str) -> list[str]:
  """The shard files that `patterns` (files, globs or folders; local or URLs) name, in order.

  Each glob's matches and each folder's files are sorted; a file met twice is kept once, at
  its first place; only `.npy` and `.bin` files count (a folder's plan.json is left out).

  Raises:
    ValueError naming `field` for a pattern that matches no shard file.
  """
  found: list[str] = []
  seen: set[str] = set()
  for pattern in patterns:
    if is_url(pattern):
      fs, inner = _filesystem(pattern)
      if glob.has_magic(inner):
        matches = sorted(_url(fs, m, pattern) for m in fs.glob(inner))
      elif fs.isdir(inner):
        matches = sorted(_url(fs, m, pattern) for m in fs.ls(inner, detail=False))
      else:
        matches = [pattern] if fs.isfile(inner) else []
    else:
      local = os.path.expanduser(pattern)
      if glob.has_magic(local):
        matches = sorted(glob.glob(local, recursive=True))
      elif os.path.isdir(local):
        matches = sorted(os.path.join(local, name) for name in os.listdir(local))
      else:
        matches = [local] if os.path.isfile(local) else []
    matches = [m for m in matches if m.endswith(SUFFIXES)]
    if not matches:
      raise ValueError(f"{field} entry {pattern!r} matches no .npy or .bin shard")
    for match in matches:
      if match not in seen:
        seen.add(match)
        found.append(match)
  return found


@dataclasses.dataclass(frozen=True)
class Shard:
  """One shard: `num_tokens` ids of `dtype` at byte `offset` of the file at `path`."""

  path: str
  offset: int
  num_tokens: int
  dtype: str


def _read_bytes(path: str, start: int, count: int) -> bytes:
  """Bytes [start, start + count) of a local file or URL (fewer at its end)."""
  if is_url(path):
    fs, inner = _filesystem(path)
    return fs.cat_file(inner, start=start, end=start + count)
  with open(path, "rb") as f:
    return os.pread(f.fileno(), count, start)


def _size(path: str) -> int:
  if is_url(path):
    fs, inner = _filesystem(path)
    return int(fs.size(inner))
  return os.path.getsize(path)


def open_shard(path: str, bin_dtype: str, field: str) -> Shard:
  """The `Shard` at `path`, from its `.npy` header or its `.bin` size (no token is read).

  Raises:
    ValueError naming `field` for a file that is not a 1-D integer `.npy`, or a `.bin` whose
    size is not a whole number of `bin_dtype` ids.
  """
  if path.endswith(".bin"):
    itemsize = np.dtype(bin_dtype).itemsize
    size = _size(path)
    if size % itemsize:
      raise ValueError(
        f"{field}: {path} holds {size} bytes, not a whole number of {bin_dtype} "
        f"ids (set data.bin_dtype to the dtype it was written with)"
      )
    return Shard(path=path, offset=0, num_tokens=size // itemsize, dtype=bin_dtype)
  head = _read_bytes(path, 0, _HEADER_PROBE)
  try:
    buffer = io.BytesIO(head)
    version = np.lib.format.read_magic(buffer)
    length_bytes = 2 if version == (1, 0) else 4
    header_length = int.from_bytes(head[8 : 8 + length_bytes], "little")
    offset = 8 + length_bytes + header_length
    if offset > len(head):
      head = _read_bytes(path, 0, offset)
      buffer = io.BytesIO(head)
      np.lib.format.read_magic(buffer)
    read_header = (
      np.lib.format.read_array_header_1_0
      if version == (1, 0)
      else np.lib.format.read_array_header_2_0
    )
    shape, _, dtype = read_header(buffer)
  except (ValueError, OSError, EOFError) as error:
    raise ValueError(f"{field}: {path} is not a .npy file ({error})") from None
  if len(shape) != 1 or dtype.kind not in "iu":
    raise ValueError(
      f"{field}: {path} must hold a 1-D integer array, got shape {shape} dtype {dtype}"
    )
  return Shard(path=path, offset=offset, num_tokens=int(shape[0]), dtype=dtype.str)


def open_shards(paths: Sequence[str], bin_dtype: str, field: str) -> tuple[Shard, ...]:
  """`open_shard` of every path, in order (headers read in parallel threads)."""
  with concurrent.futures.ThreadPoolExecutor(min(_OPEN_THREADS, max(len(paths), 1))) as pool:
    return tuple(pool.map(lambda p: open_shard(p, bin_dtype, field), paths))


class TokenSplit:
  """Tokens `[start, stop)` of the stream of `shards` joined in order; read on demand.

  Holds no open file (each read opens, reads and closes), so it pickles into Grain worker
  processes and thousands of shards need no thousands of descriptors. `repr` names the shards
  by file name and length, not by absolute local path, so a checkpointed loader state restores
  on any host.
  """

  def __init__(self, shards: Sequence[Shard], start: int = 0, stop: int | None = None):
    self.shards = tuple(shards)
    lengths = np.array([s.num_tokens for s in self.shards], np.int64)
    # (num_shards + 1,) stream position where each shard starts, and the end.
    self._bounds = np.concatenate([[0], np.cumsum(lengths)])
    total = int(self._bounds[-1])
    self.start = start
    self.stop = total if stop is None else stop
    if not 0 <= self.start <= self.stop <= total:
      raise ValueError(f"TokenSplit range [{start}, {stop}) outside the stream's {total} tokens")

  @property
  def num_tokens(self) -> int:
    return self.stop - self.start

  @property
  def remote(self) -> bool:
    """Whether any shard lies behind a URL (each read is then a network request)."""
    return any(is_url(s.path) for s in self.shards)

  def read(self, start: int, count: int) -> np.ndarray:
    """(count,) int64: tokens `[start, start + count)` of this split (not of the stream).

    Raises:
      IndexError for a range outside the split.
    """
    if start < 0 or count < 0 or start + count > self.num_tokens:
      raise IndexError(f"tokens [{start}, {start + count}) outside the split's {self.num_tokens}")
    begin, end = self.start + start, self.start + start + count
    first = int(np.searchsorted(self._bounds, begin, side="right")) - 1
    pieces = []
    index = first
    while begin < end:
      shard = self.shards[index]
      inside = begin - int(self._bounds[index])
      take = min(end - begin, shard.num_tokens - inside)
      if take > 0:
        pieces.append(self._read_shard(shard, inside, take))
        begin += take
      index += 1
    if not pieces:
      return np.zeros(0, np.int64)
    return np.concatenate(pieces).astype(np.int64, copy=False)

  def _read_shard(self, shard: Shard, first: int, count: int) -> np.ndarray:
    dtype = np.dtype(shard.dtype)
    if shard.path.endswith(".bin"):
      dtype = dtype.newbyteorder("<")
    start = shard.offset + first * dtype.itemsize
    nbytes = count * dtype.itemsize
    data = _read_bytes(shard.path, start, nbytes)
    if len(data) != nbytes:
      raise OSError(f"{shard.path}: read {len(data)} of {nbytes} bytes at {start} (file changed?)")
    return np.frombuffer(data, dtype)

  def fingerprint(self) -> str:
    """A short hash of the shards' names and lengths and of the range."""
    text = "\n".join(f"{os.path.basename(s.path)} {s.num_tokens} {s.dtype}" for s in self.shards)
    return hashlib.sha256(f"{text}\n{self.start}:{self.stop}".encode()).hexdigest()[:16]

  def __repr__(self) -> str:
    return (
      f"TokenSplit({len(self.shards)} shards, tokens [{self.start}, {self.stop}), "
      f"fingerprint {self.fingerprint()})"
    )
