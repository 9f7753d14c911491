"""The data pipeline's settings (``DataConfig``) and what ``prepare`` hands back
(``PreparedData``)."""

from __future__ import annotations

import dataclasses
import os
import pathlib

from train.data.shards import BIN_DTYPES, TokenSplit

SOURCES = ("stdlib", "text", "tokens")
# The byte-level alphabet (256 symbols) plus the end-of-text token.
MIN_TEXT_VOCAB = 257
MAX_VOCAB = 2**32


def _is_int(value: object) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the tokens come from and how they are split.

  Raises:
    TypeError / ValueError from ``__post_init__``, naming the field, for a bad value.
  """

  # "stdlib": the Python standard library's own *.py source (no download); "text": the UTF-8
  # text files or globs in `paths`, one document per file; "tokens": token shards (1-D integer
  # .npy, or raw .bin ids of `bin_dtype`) in `paths`, read in place, lazily (train.data.shards).
  source: str = "stdlib"
  # Files, directories (every file below, sorted) or globs ("**" allowed) for "text"; shard
  # files, folders (their .npy/.bin, sorted) or globs, local or URLs (gs://bucket/shards/*.npy),
  # for "tokens"; empty for "stdlib".
  paths: tuple[str, ...] = ()
  # "tokens" only: shard files or globs of a separate held-out split (then `eval_fraction` is
  # not used and every token of `paths` is trained on). Empty: the held-out split is the last
  # `eval_fraction` of the stream of `paths`.
  eval_paths: tuple[str, ...] = ()
  # The id dtype of raw .bin shards ("uint16" or "uint32", little-endian); .npy carry their own.
  bin_dtype: str = "uint16"
  # Tokenizer vocabulary to train for "stdlib"/"text" (>= 257); for "tokens" the vocabulary the
  # user declares (checked >= max id + 1).
  vocab_size: int = 32000
  # Cap on the text read for "stdlib" (the embedded default corpus), in bytes, in file order
  # (the last file is cut). The user's own data ("text", "tokens") is never cut.
  max_corpus_bytes: int = 8_000_000
  # The held-out split: the last fraction of the token stream, in [0, 1).
  eval_fraction: float = 0.02
  # Where prepared files live; None: $CCE_JAX_CACHE, else ~/.cache/cce_jax.
  cache_dir: str | None = None
  # Shuffle the training windows every epoch (read by the trainer, passed to `make_loader`).
  shuffle: bool = True
  # Grain worker processes (0 = in-process; read by the trainer, passed to `make_loader`).
  worker_count: int = 0

  def __post_init__(self):
    if not isinstance(self.source, str):
      raise TypeError(f"DataConfig.source must be a str, got {type(self.source).__name__}")
    if self.source not in SOURCES:
      raise ValueError(f"DataConfig.source must be one of {SOURCES}, got {self.source!r}")
    paths = self.paths
    if isinstance(paths, str | os.PathLike):
      raise TypeError(f"DataConfig.paths must be a sequence of paths, not one path: {paths!r}")
    try:
      paths = tuple(os.fspath(p) for p in paths)
    except TypeError as error:
      raise TypeError(f"DataConfig.paths must be a sequence of str paths: {error}") from None
    object.__setattr__(self, "paths", paths)
    if self.source == "stdlib" and paths:
      raise ValueError(f"DataConfig.paths must be empty for source='stdlib', got {paths}")
    if self.source == "text" and not paths:
      raise ValueError("DataConfig.paths must name at least one file or glob for source='text'")
    if self.source == "tokens" and not paths:
      raise ValueError(
        "DataConfig.paths must name at least one shard file or glob for source='tokens'"
      )
    eval_paths = self.eval_paths
    if isinstance(eval_paths, str | os.PathLike):
      raise TypeError(
        f"DataConfig.eval_paths must be a sequence of paths, not one path: {eval_paths!r}"
      )
    try:
      eval_paths = tuple(os.fspath(p) for p in eval_paths)
    except TypeError as error:
      raise TypeError(f"DataConfig.eval_paths must be a sequence of str paths: {error}") from None
    object.__setattr__(self, "eval_paths", eval_paths)
    if eval_paths and self.source != "tokens":
      raise ValueError(
        f"DataConfig.eval_paths is for source='tokens' only, got source={self.source!r}"
      )
    if self.bin_dtype not in BIN_DTYPES:
      raise ValueError(f"DataConfig.bin_dtype must be one of {BIN_DTYPES}, got {self.bin_dtype!r}")
    if not _is_int(self.vocab_size):
      raise TypeError(f"DataConfig.vocab_size must be an int, got {self.vocab_size!r}")
    low = 1 if self.source == "tokens" else MIN_TEXT_VOCAB
    if not low <= self.vocab_size <= MAX_VOCAB:
      raise ValueError(
        f"DataConfig.vocab_size must be in [{low}, {MAX_VOCAB}] for source={self.source!r}, "
        f"got {self.vocab_size}"
      )
    if not _is_int(self.max_corpus_bytes) or self.max_corpus_bytes < 1:
      raise ValueError(
        f"DataConfig.max_corpus_bytes must be an int >= 1, got {self.max_corpus_bytes!r}"
      )
    if (
      isinstance(self.eval_fraction, bool)
      or not isinstance(self.eval_fraction, int | float)
      or not 0.0 <= self.eval_fraction < 1.0
    ):
      raise ValueError(
        f"DataConfig.eval_fraction must be a float in [0, 1), got {self.eval_fraction!r}"
      )
    if self.cache_dir is not None:
      if not isinstance(self.cache_dir, str | os.PathLike):
        raise TypeError(f"DataConfig.cache_dir must be a path or None, got {self.cache_dir!r}")
      object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
    if not isinstance(self.shuffle, bool):
      raise TypeError(f"DataConfig.shuffle must be a bool, got {self.shuffle!r}")
    if not _is_int(self.worker_count) or self.worker_count < 0:
      raise ValueError(f"DataConfig.worker_count must be an int >= 0, got {self.worker_count!r}")

  def resolved_cache_dir(self) -> pathlib.Path:
    """``cache_dir``, else $CCE_JAX_CACHE, else ~/.cache/cce_jax (not created here)."""
    if self.cache_dir is not None:
      return pathlib.Path(self.cache_dir).expanduser()
    env = os.environ.get("CCE_JAX_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "cce_jax"


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """The prepared token files, or the shards read in place.

  For "stdlib"/"text" each token file is a 1-D ``.npy`` in the cache (open with
  ``np.load(path, mmap_mode="r")``) of dtype uint16 when ``vocab_size <= 65536``, else uint32; each
  document is followed by the end-of-text token (``train.data.EOT``); the eval file is the last
  ``eval_fraction`` of the stream. For "tokens" nothing is copied: ``train_tokens`` and
  ``eval_tokens`` describe the shards, and ``train_split``/``eval_split`` read them
  (``train.data.shards.TokenSplit``).
  """

  train_tokens: str
  eval_tokens: str
  # The real vocabulary size (the tokenizer's, for "stdlib"/"text"; the declared one for "tokens").
  vocab_size: int
  # tokenizer.json of the HF tokenizer, None for source="tokens".
  tokenizer_path: str | None
  num_train_tokens: int
  num_eval_tokens: int
  # "tokens": the splits of the shards (None: the whole `train_tokens`/`eval_tokens` file).
  train_split: TokenSplit | None = dataclasses.field(default=None, compare=False)
  eval_split: TokenSplit | None = dataclasses.field(default=None, compare=False)
