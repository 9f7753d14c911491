"""``prepare``: text or token ids in, cached memory-mappable train/eval token files out.

Text ("stdlib", "text") goes through two cache entries: ``tokenizer-<key>`` (a byte-level BPE
trained on the corpus; the key hashes the corpus content and the vocabulary size) and
``tokens-<key>`` (the encoded stream split into train.npy and eval.npy; the key adds the eval
fraction). Entries are built once, under a lock, and appear atomically (see
``train.data.cache``). Nothing is downloaded. "tokens" copies nothing: the user's shards are
read in place, lazily (``train.data.shards``); only their headers are read here.

Run ``python -m train.data.prepare --help`` to prepare from the command line.
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Iterable

import numpy as np

from train.data import cache, corpus, shards
from train.data import tokenizer as tokenizer_lib
from train.data.config import DataConfig, PreparedData

# Elements copied per step when splitting a stream into its train and eval files.
_COPY_CHUNK = 1 << 24


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id of a ``vocab_size`` vocabulary fits, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _write_splits(
  stream_N: np.ndarray, eval_fraction: float, vocab_size: int, out_dir: pathlib.Path
) -> dict:
  """Copies the 1-D stream into out_dir/train.npy (head) and out_dir/eval.npy (last fraction).

  Raises:
    ValueError naming ``vocab_size`` for an id outside [0, vocab_size); ValueError when the train
    split would be empty.
  """
  num_tokens = int(stream_N.shape[0])
  num_eval = round(num_tokens * eval_fraction)
  num_train = num_tokens - num_eval
  if num_train < 1:
    raise ValueError(
      f"the corpus holds {num_tokens} tokens: nothing left to train on after the "
      f"eval split (eval_fraction={eval_fraction})"
    )
  dtype = token_dtype(vocab_size)
  for name, start, stop in (("train", 0, num_train), ("eval", num_train, num_tokens)):
    out = np.lib.format.open_memmap(
      out_dir / f"{name}.npy", mode="w+", dtype=dtype, shape=(stop - start,)
    )
    for begin in range(start, stop, _COPY_CHUNK):
      chunk = np.asarray(stream_N[begin : min(begin + _COPY_CHUNK, stop)])
      low, high = int(chunk.min()), int(chunk.max())
      if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(
          f"DataConfig.vocab_size={vocab_size} does not cover token id {bad} "
          f"(ids must lie in [0, vocab_size))"
        )
      out[begin - start : begin - start + chunk.shape[0]] = chunk
    out.flush()
    del out
  return {"num_train_tokens": num_train, "num_eval_tokens": num_eval, "dtype": dtype.name}


def _write_stream(chunks: Iterable[np.ndarray], path: pathlib.Path, dtype: np.dtype) -> np.ndarray:
  """Appends the chunks to a raw file and returns it as a read-only 1-D memmap."""
  count = 0
  with open(path, "wb") as f:
    for chunk in chunks:
      f.write(chunk.astype(dtype).tobytes())
      count += chunk.shape[0]
  return np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)


def _text_files(cfg: DataConfig) -> list[pathlib.Path]:
  return corpus.stdlib_files() if cfg.source == "stdlib" else corpus.text_files(cfg.paths)


def _max_bytes(cfg: DataConfig) -> int | None:
  """The byte cap: it sizes the embedded default corpus; the user's own text is read whole."""
  return cfg.max_corpus_bytes if cfg.source == "stdlib" else None


def cached_tokenizer(cfg: DataConfig) -> tuple[pathlib.Path, int]:
  """The byte-level BPE of a "stdlib"/"text" config: (its tokenizer.json, its vocabulary size).

  Trained on the config's corpus once and cached (the entry ``tokenizer-<key>``); the trainer
  and ``python -m train.data.prepare tokenizer=bpe`` share it.

  Raises:
    ValueError for a "tokens" config (it has no tokenizer) or paths that match nothing.
  """
  if cfg.source == "tokens":
    raise ValueError("DataConfig.source='tokens' has no tokenizer; use 'stdlib' or 'text'")
  files = _text_files(cfg)
  max_bytes = _max_bytes(cfg)

  def build_tokenizer(out_dir: pathlib.Path) -> dict:
    start = time.perf_counter()
    # The BPE is trained on at most max_corpus_bytes of text; every byte is encoded below.
    texts = (text for text, _ in corpus.iter_documents(files, cfg.max_corpus_bytes))
    tokenizer = tokenizer_lib.train_tokenizer(texts, cfg.vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return {"vocab_size": tokenizer.get_vocab_size(), "train_seconds": time.perf_counter() - start}

  tokenizer_description = {
    "tokenizer": "bpe-bytelevel",
    "corpus_sha256": corpus.fingerprint(files, max_bytes),
    "vocab_size": cfg.vocab_size,
  }
  tokenizer_dir, tokenizer_meta = cache.build_once(
    cfg.resolved_cache_dir(), "tokenizer", tokenizer_description, build_tokenizer
  )
  return tokenizer_dir / "tokenizer.json", int(tokenizer_meta["vocab_size"])


def _prepare_text(cfg: DataConfig, cache_dir: pathlib.Path) -> PreparedData:
  files = _text_files(cfg)
  documents = lambda: corpus.iter_documents(files, _max_bytes(cfg))
  tokenizer_path, vocab_size = cached_tokenizer(cfg)
  tokenizer_dir = tokenizer_path.parent

  def build_tokens(out_dir: pathlib.Path) -> dict:
    start = time.perf_counter()
    tokenizer = tokenizer_lib.load(str(tokenizer_path))
    chunks = tokenizer_lib.encode_stream(tokenizer, documents())
    stream_N = _write_stream(chunks, out_dir / "stream.bin", token_dtype(vocab_size))
    meta = _write_splits(stream_N, cfg.eval_fraction, vocab_size, out_dir)
    del stream_N
    os.remove(out_dir / "stream.bin")
    return {**meta, "vocab_size": vocab_size, "encode_seconds": time.perf_counter() - start}

  tokens_description = {"tokenizer_entry": tokenizer_dir.name, "eval_fraction": cfg.eval_fraction}
  tokens_dir, meta = cache.build_once(cache_dir, "tokens", tokens_description, build_tokens)
  return _prepared(tokens_dir, meta, str(tokenizer_path))


def _prepare_tokens(cfg: DataConfig) -> PreparedData:
  """The "tokens" source: the shards' headers are read, their tokens stay where they are."""
  train_shards = shards.open_shards(
    shards.expand(cfg.paths, "data.paths"), cfg.bin_dtype, "data.paths"
  )
  stream = shards.TokenSplit(train_shards)
  if cfg.eval_paths:
    eval_shards = shards.open_shards(
      shards.expand(cfg.eval_paths, "data.eval_paths"), cfg.bin_dtype, "data.eval_paths"
    )
    train_split, eval_split = stream, shards.TokenSplit(eval_shards)
  else:
    num_eval = round(stream.num_tokens * cfg.eval_fraction)
    boundary = stream.num_tokens - num_eval
    train_split = shards.TokenSplit(train_shards, 0, boundary)
    eval_split = shards.TokenSplit(train_shards, boundary, stream.num_tokens)
  if train_split.num_tokens < 1:
    raise ValueError(
      f"data.paths: the shards hold {stream.num_tokens} tokens, nothing to train "
      f"on (data.eval_fraction={cfg.eval_fraction})"
    )

  def describe(split: shards.TokenSplit, field: str) -> str:
    return f"{len(split.shards)} shards of {field}"

  return PreparedData(
    train_tokens=describe(train_split, "data.paths"),
    eval_tokens=describe(eval_split, "data.eval_paths" if cfg.eval_paths else "data.paths"),
    vocab_size=cfg.vocab_size,
    tokenizer_path=None,
    num_train_tokens=train_split.num_tokens,
    num_eval_tokens=eval_split.num_tokens,
    train_split=train_split,
    eval_split=eval_split,
  )


def _prepared(tokens_dir: pathlib.Path, meta: dict, tokenizer_path: str | None) -> PreparedData:
  return PreparedData(
    train_tokens=str(tokens_dir / "train.npy"),
    eval_tokens=str(tokens_dir / "eval.npy"),
    vocab_size=int(meta["vocab_size"]),
    tokenizer_path=tokenizer_path,
    num_train_tokens=int(meta["num_train_tokens"]),
    num_eval_tokens=int(meta["num_eval_tokens"]),
  )


def prepare(cfg: DataConfig) -> PreparedData:
  """Tokenizes the configured text into cached train/eval token files, or opens the shards.

  Idempotent: a second call with the same inputs reads the cache (no tokenizer training, no
  encoding). Safe under concurrent callers sharing ``cache_dir``: one builds, the others wait.
  For source="tokens" it reads only the shards' headers (ids beyond ``vocab_size`` are caught
  when a window holding one is read).

  Raises:
    ValueError naming the field for paths that match nothing, a shard that is not a 1-D
    integer .npy (or a .bin of whole ids), or a corpus too small to leave train tokens.
  """
  if not isinstance(cfg, DataConfig):
    raise TypeError(f"prepare expects a DataConfig, got {type(cfg).__name__}")
  cache_dir = cfg.resolved_cache_dir()
  if cfg.source == "tokens":
    return _prepare_tokens(cfg)
  return _prepare_text(cfg, cache_dir)


def load_tokenizer(prepared: PreparedData):
  """The HF ``tokenizers.Tokenizer`` of ``prepared`` (for decoding samples).

  Raises:
    ValueError when ``prepared`` came from source="tokens" (no tokenizer).
  """
  if prepared.tokenizer_path is None:
    raise ValueError("prepared.tokenizer_path is None: source='tokens' data has no tokenizer")
  return tokenizer_lib.load(prepared.tokenizer_path)
