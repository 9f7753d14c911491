"""Serving batches: a Grain ``DataLoader`` over fixed-length windows of a split's token stream.

A split's token stream (documents joined by EOT, see ``train.data.prepare``) is cut into
``num_windows = num_tokens // seq_len`` non-overlapping windows; window ``w`` is
``stream[w * seq_len:(w + 1) * seq_len]`` (the tail shorter than a window is never served).
Epoch ``e`` visits the windows in the order ``window_order(e)`` (a permutation seeded by
``(seed, e)``, or ``0, 1, 2, ...`` without shuffling), cut into ``num_windows // global_batch_size``
global batches of ``global_batch_size`` windows (the remainder is dropped every epoch).

Multi-host: process ``p`` of ``P`` serves rows ``[p * B, (p + 1) * B)`` of every global batch, with
``B = global_batch_size // P``, so stacking the processes' batches in process order gives the
single-process global batch of the same seed. The loader's iterator is checkpointable
(``get_state()`` / ``set_state()``): a restored iterator yields exactly the batches that followed.
"""

from __future__ import annotations

import sys
import threading

import grain.python as grain
import numpy as np
from absl import flags

from train.data.config import PreparedData
from train.data.shards import TokenSplit, open_shards

SPLITS = ("train", "eval")


class TokenWindows:
  """Random-access source: window ``w`` of a split, as {"tokens": int32 (seq_len,)}.

  The split is a `TokenSplit` of shards (source "tokens") or one token .npy (the cache's files);
  a window is read when it is asked for, so a process reads only its own rows. `vocab_size`
  (when given) is checked on every window read.

  Raises (from `__getitem__`):
    ValueError naming `data.vocab_size` for a token id outside [0, vocab_size).
  """

  def __init__(self, split: TokenSplit, seq_len: int, vocab_size: int | None = None):
    self._split = split
    self._seq_len = seq_len
    self._vocab_size = vocab_size
    self.num_tokens = split.num_tokens
    self.remote = split.remote

  def __len__(self) -> int:
    return self.num_tokens // self._seq_len

  def __getitem__(self, window: int) -> dict[str, np.ndarray]:
    tokens_L = self._split.read(int(window) * self._seq_len, self._seq_len)  # (seq_len,)
    if self._vocab_size is not None and tokens_L.size:
      low, high = int(tokens_L.min()), int(tokens_L.max())
      if low < 0 or high >= self._vocab_size:
        raise ValueError(
          f"data.vocab_size={self._vocab_size} does not cover token id "
          f"{low if low < 0 else high} in window {window} of {self._split!r}"
        )
    return {"tokens": tokens_L.astype(np.int32)}

  def __repr__(self) -> str:
    # Names the shards by file name and length (see TokenSplit), not by absolute path, so a
    # checkpoint restores on a host whose files live elsewhere.
    return f"TokenWindows({self._split!r}, seq_len={self._seq_len})"


class EpochSampler:
  """Grain sampler: global index ``g`` to the window it serves (see the module docstring).

  The DataLoader's ``ShardOptions(p, P)`` hands process ``p`` the indices ``g = i * P + p``; local
  record ``i`` lies in epoch ``i // (batches_per_epoch * B)``, global batch ``k``, row ``j`` of that
  process's ``B`` rows, and serves window ``window_order(epoch)[k * G + p * B + j]``.
  """

  def __init__(
    self,
    *,
    num_windows: int,
    global_batch_size: int,
    process_count: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
  ):
    self.num_windows = num_windows
    self.global_batch_size = global_batch_size
    self.process_count = process_count
    self.seed = seed
    self.shuffle = shuffle
    self.num_epochs = num_epochs
    self.batches_per_epoch = num_windows // global_batch_size
    per_epoch = self.batches_per_epoch * global_batch_size
    self._length = (
      sys.maxsize // per_epoch * per_epoch if num_epochs is None else num_epochs * per_epoch
    )
    self._orders: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def window_order(self, epoch: int) -> np.ndarray:
    """(num_windows,) int64: the order in which epoch ``epoch`` visits the windows."""
    with self._lock:
      order = self._orders.get(epoch)
      if order is None:
        if self.shuffle:
          order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        else:
          order = np.arange(self.num_windows)
        self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
        self._orders[epoch] = order
      return order

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if not 0 <= index < self._length:
      raise IndexError(f"sampler index {index} outside [0, {self._length})")
    process, local = index % self.process_count, index // self.process_count
    rows = self.global_batch_size // self.process_count
    epoch, in_epoch = divmod(local, self.batches_per_epoch * rows)
    batch, row = divmod(in_epoch, rows)
    position = batch * self.global_batch_size + process * rows + row
    window = int(self.window_order(epoch)[position])
    return grain.RecordMetadata(index=index, record_key=window, rng=None)

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_orders": {}, "_lock": None}

  def __setstate__(self, state: dict):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    # Grain checks a restored state against this: everything that decides the order.
    return (
      f"EpochSampler(num_windows={self.num_windows}, "
      f"global_batch_size={self.global_batch_size}, process_count={self.process_count}, "
      f"seed={self.seed}, shuffle={self.shuffle}, num_epochs={self.num_epochs})"
    )


def _allow_grain_workers_without_absl() -> None:
  """Lets Grain start worker processes in a program that never parsed absl flags.

  Grain 0.2.18 reads an absl flag when it starts workers and raises UnparsedFlagAccessError in
  scripts that do not use ``absl.app`` (google/grain#1355, fixed upstream in #1362). Marking the
  flags parsed makes them read their defaults; a program that parsed its flags is left alone.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# Threads reading the windows of shards behind URLs: each window is a network request.
REMOTE_READ_THREADS = 16


def _read_options(source: TokenWindows, rows: int) -> grain.ReadOptions:
  """Local files: read in the iterating thread (a read is a page-cache copy; threads would only
  contend for the GIL). URLs: `REMOTE_READ_THREADS` threads fetch the rows of up to two batches
  (at least `REMOTE_READ_THREADS` rows) ahead."""
  if not source.remote:
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return grain.ReadOptions(
    num_threads=REMOTE_READ_THREADS, prefetch_buffer_size=max(2 * rows, REMOTE_READ_THREADS)
  )


def _split_of(prepared: PreparedData, split: str) -> TokenSplit:
  """The `TokenSplit` of `split`: the shards' for source "tokens", else the cached .npy."""
  given = prepared.train_split if split == "train" else prepared.eval_split
  if given is not None:
    return given
  path = prepared.train_tokens if split == "train" else prepared.eval_tokens
  return TokenSplit(open_shards([path], "uint16", f"prepared.{split}_tokens"))


def _check_int(name: str, value: object, low: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool):
    raise TypeError(f"make_loader: `{name}` must be an int, got {value!r}")
  if value < low:
    raise ValueError(f"make_loader: `{name}` must be >= {low}, got {value}")


def make_loader(
  prepared: PreparedData,
  *,
  split: str,
  seq_len: int,
  global_batch_size: int,
  seed: int,
  shuffle: bool = True,
  process_index: int = 0,
  process_count: int = 1,
  num_epochs: int | None = None,
  worker_count: int = 0,
) -> grain.DataLoader:
  """A Grain DataLoader of packed, shuffled, fixed-length token windows of one split.

  Iterating it yields {"tokens": int32 (global_batch_size // process_count, seq_len)}: this
  process's rows of each global batch (see the module docstring for the order). Rows are
  ``seq_len`` tokens; a trainer predicting the next token uses them with ``shift=1``.
  ``num_epochs=None`` repeats forever; otherwise iteration stops after that many epochs of
  ``num_windows // global_batch_size`` batches. ``worker_count`` > 0 reads in Grain worker
  processes (same batches, same checkpoint semantics).

  Raises:
    TypeError / ValueError naming the argument: ``split`` not in ("train", "eval"); non-positive
    sizes; ``global_batch_size`` not divisible by ``process_count``; ``process_index`` outside
    [0, process_count); a split with fewer than ``seq_len`` tokens or fewer than
    ``global_batch_size`` windows.
  """
  if not isinstance(prepared, PreparedData):
    raise TypeError(
      f"make_loader: `prepared` must be a PreparedData, got {type(prepared).__name__}"
    )
  if not isinstance(split, str) or split not in SPLITS:
    raise ValueError(f"make_loader: `split` must be one of {SPLITS}, got {split!r}")
  _check_int("seq_len", seq_len, 1)
  _check_int("global_batch_size", global_batch_size, 1)
  _check_int("seed", seed, 0)
  _check_int("process_count", process_count, 1)
  _check_int("process_index", process_index, 0)
  _check_int("worker_count", worker_count, 0)
  if num_epochs is not None:
    _check_int("num_epochs", num_epochs, 1)
  if not isinstance(shuffle, bool):
    raise TypeError(f"make_loader: `shuffle` must be a bool, got {shuffle!r}")
  if process_index >= process_count:
    raise ValueError(
      f"make_loader: `process_index` must be in [0, process_count={process_count}), "
      f"got {process_index}"
    )
  if global_batch_size % process_count:
    raise ValueError(
      f"make_loader: `global_batch_size`={global_batch_size} must be divisible by "
      f"`process_count`={process_count}"
    )
  source = TokenWindows(
    _split_of(prepared, split),
    seq_len,
    prepared.vocab_size if prepared.train_split is not None else None,
  )
  if source.num_tokens < seq_len:
    raise ValueError(
      f"make_loader: the {split!r} split holds {source.num_tokens} tokens, fewer "
      f"than `seq_len`={seq_len}"
    )
  if len(source) < global_batch_size:
    raise ValueError(
      f"make_loader: the {split!r} split holds {len(source)} windows of "
      f"`seq_len`={seq_len} tokens, fewer than `global_batch_size`="
      f"{global_batch_size}"
    )
  sampler = EpochSampler(
    num_windows=len(source),
    global_batch_size=global_batch_size,
    process_count=process_count,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
  )
  rows = global_batch_size // process_count
  if worker_count:
    _allow_grain_workers_without_absl()
  return grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=[grain.Batch(batch_size=rows, drop_remainder=True)],
    worker_count=worker_count,
    shard_options=grain.ShardOptions(
      shard_index=process_index, shard_count=process_count, drop_remainder=True
    ),
    read_options=_read_options(source, rows),
  )
