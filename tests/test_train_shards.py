"""The "tokens" source: many token shards (.npy, raw .bin), local or on gs://, read lazily.

References are the shards concatenated with numpy (int64); shard lengths are random and not
multiples of seq_len, so windows cross shard boundaries. The gs:// tests run against the
in-memory Cloud Storage of tests/gcs_testing.py, which counts the bytes each object hands out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import gcs_testing
import numpy as np
import pytest
import train_testing

from train import config
from train.data import DataConfig, make_loader, prepare, shards

SEQ_LEN = 24
VOCAB = 1000


def _write_corpus(
  directory: pathlib.Path, count: int, seed: int, max_length: int = 400
) -> np.ndarray:
  """`count` shards of random ids (.npy of several dtypes and raw uint16 .bin); their stream."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  parts = []
  for i in range(count):
    ids = rng.integers(0, VOCAB, size=int(rng.integers(1, max_length)))
    if i % 3 == 2:
      ids.astype("<u2").tofile(directory / f"part-{i:03d}.bin")
    else:
      np.save(directory / f"part-{i:03d}.npy", ids.astype((np.uint16, np.int32)[i % 2]))
    parts.append(ids)
  return np.concatenate(parts)


def _rows(loader, steps: int) -> list[np.ndarray]:
  iterator = iter(loader)
  return [next(iterator)["tokens"] for _ in range(steps)]


def _windows(stream_N: np.ndarray, batch_BL: np.ndarray) -> list[int]:
  """The window index of each row, checked against the reference stream."""
  seq_len = batch_BL.shape[1]
  found = []
  for row in batch_BL:
    matches = [
      w
      for w in range(stream_N.size // seq_len)
      if np.array_equal(stream_N[w * seq_len : (w + 1) * seq_len], row)
    ]
    assert len(matches) == 1, row
    found.append(matches[0])
  return found


def test_split_reads_any_range_of_the_joined_shards(tmp_path):
  stream_N = _write_corpus(tmp_path, 17, seed=0)
  paths = shards.expand([str(tmp_path / "*.npy"), str(tmp_path / "part-*.bin")], "data.paths")
  assert len(paths) == 17 and paths == sorted(paths, key=lambda p: p.endswith(".bin"))
  opened = shards.open_shards(sorted(paths), "uint16", "data.paths")
  split = shards.TokenSplit(opened, 5, stream_N.size - 3)
  assert split.num_tokens == stream_N.size - 8
  rng = np.random.default_rng(1)
  for _ in range(50):
    start = int(rng.integers(0, split.num_tokens))
    count = int(rng.integers(0, min(900, split.num_tokens - start) + 1))
    np.testing.assert_array_equal(split.read(start, count), stream_N[5 + start : 5 + start + count])
  with pytest.raises(IndexError):
    split.read(split.num_tokens - 1, 2)


def test_tokens_source_serves_windows_of_the_stream_with_an_eval_tail(tmp_path):
  stream_N = _write_corpus(tmp_path / "shards", 23, seed=2)
  prepared = prepare(
    DataConfig(
      source="tokens",
      paths=(str(tmp_path / "shards" / "part-*"),),
      vocab_size=VOCAB,
      eval_fraction=0.1,
    )
  )
  num_eval = round(stream_N.size * 0.1)
  assert (prepared.num_train_tokens, prepared.num_eval_tokens) == (
    stream_N.size - num_eval,
    num_eval,
  )
  assert prepared.tokenizer_path is None and prepared.vocab_size == VOCAB
  assert not list(tmp_path.glob("**/tokens-*"))  # nothing copied into a cache
  train_N, eval_N = stream_N[:-num_eval], stream_N[-num_eval:]
  loader = make_loader(
    prepared, split="train", seq_len=SEQ_LEN, global_batch_size=4, seed=0, shuffle=False
  )
  for step, batch in enumerate(_rows(loader, 5)):
    np.testing.assert_array_equal(
      batch, train_N[step * 4 * SEQ_LEN : (step + 1) * 4 * SEQ_LEN].reshape(4, SEQ_LEN)
    )
  evals = make_loader(
    prepared, split="eval", seq_len=SEQ_LEN, global_batch_size=2, seed=0, shuffle=False
  )
  np.testing.assert_array_equal(
    next(iter(evals))["tokens"], eval_N[: 2 * SEQ_LEN].reshape(2, SEQ_LEN)
  )
  shuffled = _rows(
    make_loader(prepared, split="train", seq_len=SEQ_LEN, global_batch_size=4, seed=3), 3
  )
  windows = [w for batch in shuffled for w in _windows(train_N, batch)]
  assert len(set(windows)) == len(windows) and windows != sorted(windows)


def test_eval_paths_are_a_separate_split(tmp_path):
  train_N = _write_corpus(tmp_path / "train", 5, seed=4)
  eval_N = _write_corpus(tmp_path / "eval", 3, seed=5)
  prepared = prepare(
    DataConfig(
      source="tokens",
      paths=(str(tmp_path / "train" / "*"),),
      eval_paths=(str(tmp_path / "eval" / "*"),),
      vocab_size=VOCAB,
    )
  )
  assert (prepared.num_train_tokens, prepared.num_eval_tokens) == (train_N.size, eval_N.size)
  evals = make_loader(
    prepared, split="eval", seq_len=SEQ_LEN, global_batch_size=3, seed=0, shuffle=False
  )
  np.testing.assert_array_equal(
    next(iter(evals))["tokens"], eval_N[: 3 * SEQ_LEN].reshape(3, SEQ_LEN)
  )


@pytest.mark.parametrize(
  "write, field, match",
  [
    (lambda d: None, "paths", r"data\.paths entry .* matches no \.npy or \.bin shard"),
    (lambda d: np.save(d / "a.npy", np.zeros((3, 4), np.int32)), "paths", "1-D integer"),
    (lambda d: np.save(d / "a.npy", np.ones(8, np.float32)), "paths", "1-D integer"),
    (lambda d: (d / "a.npy").write_text("not an array"), "paths", r"not a \.npy file"),
    (lambda d: (d / "a.bin").write_bytes(b"\x01\x02\x03"), "paths", "bin_dtype"),
  ],
)
def test_bad_shards_are_named(tmp_path, write, field, match):
  write(tmp_path)
  with pytest.raises(ValueError, match=rf"data\.{field}.*{match}|{match}"):
    prepare(DataConfig(source="tokens", paths=(str(tmp_path / "a.*"),), vocab_size=VOCAB))


def test_an_id_beyond_the_vocabulary_is_named_when_read(tmp_path):
  np.save(tmp_path / "a.npy", np.r_[np.arange(100), 5000, np.arange(100)])
  prepared = prepare(
    DataConfig(
      source="tokens", paths=(str(tmp_path / "a.npy"),), vocab_size=VOCAB, eval_fraction=0.0
    )
  )
  loader = make_loader(
    prepared, split="train", seq_len=10, global_batch_size=20, seed=0, shuffle=False
  )
  with pytest.raises(ValueError, match=r"data\.vocab_size=1000 does not cover token id 5000"):
    next(iter(loader))


def test_trainer_names_a_missing_shard_in_one_config_error(tmp_path):
  with pytest.raises(config.ConfigError, match=r"data\.paths entry .*nothing-\*\.npy"):
    train_testing.train(
      [f"workdir={tmp_path}", "data.source=tokens", f"data.paths=[{tmp_path}/nothing-*.npy]"]
    )


def test_uint32_bin_shards(tmp_path):
  ids = np.random.default_rng(6).integers(0, 100_000, size=500)
  ids.astype("<u4").tofile(tmp_path / "a.bin")
  prepared = prepare(
    DataConfig(
      source="tokens",
      paths=(str(tmp_path / "a.bin"),),
      vocab_size=100_000,
      bin_dtype="uint32",
      eval_fraction=0.0,
    )
  )
  assert prepared.num_train_tokens == 500
  np.testing.assert_array_equal(prepared.train_split.read(0, 500), ids)


# --- on gs:// ------------------------------------------------------------------------------------


@pytest.fixture
def gcs(monkeypatch):
  monkeypatch.setenv("EPATH_USE_TF", "false")
  yield gcs_testing.install(monkeypatch.setitem)
  gcs_testing.clear_epath_filesystems()


def _pieces(split: shards.TokenSplit, windows: list[int], seq_len: int) -> set[tuple]:
  """(object name, first byte, end byte) of each shard piece that the windows (of seq_len
  tokens, from the split's start) span: the reads that serve them."""
  found = set()
  for window in windows:
    begin, end = split.start + window * seq_len, split.start + (window + 1) * seq_len
    position = 0
    for shard in split.shards:
      first, last = max(begin, position), min(end, position + shard.num_tokens)
      if first < last:
        itemsize = np.dtype(shard.dtype).itemsize
        found.add(
          (
            shard.path.removeprefix("gs:/"),
            shard.offset + (first - position) * itemsize,
            shard.offset + (last - position) * itemsize,
          )
        )
      position += shard.num_tokens
  return found


def _host_windows(stream_N, loader, steps: int) -> list[list[int]]:
  """The windows of the rows of each of the first `steps` batches of `loader`."""
  return [_windows(stream_N, rows) for rows in _rows(loader, steps)]


def _is_header(read: list) -> bool:
  """Whether a read [name, start, end] is of a .npy header (tokens start after it)."""
  return read[0].endswith(".npy") and read[1] == 0


def _check_reads(reads, split, consumed: list[int], ahead: list[int], seq_len: int) -> None:
  """The token reads of one host: every piece of the windows it consumed, and otherwise only
  pieces of its own windows of the next batches (read ahead by the loader's threads)."""
  token_reads = {tuple(r) for r in reads if not _is_header(r)}
  assert _pieces(split, consumed, seq_len) <= token_reads
  assert token_reads <= _pieces(split, consumed + ahead, seq_len)


def test_each_host_reads_only_its_rows_from_gs(tmp_path, gcs):
  stream_N = _write_corpus(tmp_path / "local", 40, seed=7)
  gcs_testing.upload(tmp_path / "local", "gs://bucket/corpus")
  npy_names = sorted(f"/bucket/corpus/{p.name}" for p in (tmp_path / "local").glob("*.npy"))
  cfg = DataConfig(
    source="tokens", paths=("gs://bucket/corpus/part-*",), vocab_size=VOCAB, eval_fraction=0.0
  )
  args = dict(split="train", seq_len=SEQ_LEN, global_batch_size=8, seed=9)
  steps = 6
  per_host = []
  for process in range(2):
    gcs.bytes_read.clear()
    prepared = prepare(cfg)
    # Opening reads the .npy headers (a .bin's size is metadata), no token.
    assert sorted(gcs.bytes_read) == npy_names and max(gcs.bytes_read.values()) <= 256
    gcs.bytes_read.clear()
    gcs.reads.clear()
    loader = make_loader(prepared, process_index=process, process_count=2, **args)
    rows = _rows(loader, steps)
    reads, bytes_read = list(gcs.reads), sum(gcs.bytes_read.values())
    per_host.append(rows)
    windows = _host_windows(stream_N, loader, steps + 5)  # (reads again)
    assert [_windows(stream_N, r) for r in rows] == windows[:steps]
    # Its 4 rows of each of the 6 batches, and at most its rows of the 4 batches (16 rows, one
    # per reading thread) read ahead.
    _check_reads(
      reads,
      prepared.train_split,
      [w for batch in windows[:steps] for w in batch],
      [w for batch in windows[steps:] for w in batch],
      SEQ_LEN,
    )
    assert bytes_read <= (steps + 4) * 4 * SEQ_LEN * 4 < stream_N.size * 2 * 0.7
  whole = _rows(make_loader(prepare(cfg), **args), steps)
  for step in range(steps):
    np.testing.assert_array_equal(
      np.concatenate([per_host[0][step], per_host[1][step]]), whole[step]
    )


@pytest.mark.slow  # about 30 s on 2 busy cores: two trainer processes compile the tiny model
def test_two_process_run_reads_each_hosts_rows_from_gs(tmp_path):
  """Two trainer processes (jax.distributed on 127.0.0.1), each with the data on gs://."""
  local = tmp_path / "local"
  stream_N = _write_corpus(local, 30, seed=8, max_length=3000)
  steps, batch, seq_len = 3, 8, 32
  args = [
    f"workdir={tmp_path / 'run'}",
    "data.source=tokens",
    "data.paths=[gs://bucket/corpus/part-*]",
    f"data.vocab_size={VOCAB}",
    "data.eval_fraction=0.0",
    *train_testing.TINY_MODEL,
    f"batch_size={batch}",
    f"seq_len={seq_len}",
    f"steps={steps}",
    "log_every=1",
    "eval_every=0",
    "checkpoint_every=1000",
    *train_testing.QUIET,
  ]
  env = train_testing.subprocess_env(
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{train_testing.free_port()}",
    JAX_NUM_PROCESSES="2",
    XLA_FLAGS=train_testing.FAST_COMPILE,
    JAX_PLATFORMS="cpu",
  )
  env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(__file__).parent), env["PYTHONPATH"]])
  script = pathlib.Path(__file__).parent / "gcs_testing.py"
  processes = [
    subprocess.Popen(
      [
        sys.executable,
        str(script),
        str(local),
        "gs://bucket/corpus",
        str(tmp_path / f"counts{i}.json"),
        "--",
        *args,
      ],
      cwd=train_testing.ROOT,
      env={**env, "JAX_PROCESS_ID": str(i)},
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in processes]
  for process, output in zip(processes, outputs, strict=True):
    assert process.returncode == 0, output
  assert f"{stream_N.size / 1e6:.1f}M training tokens" in outputs[0]
  # The reference: the same corpus read locally; host i serves rows [4i, 4i + 4) of each batch.
  prepared = prepare(
    DataConfig(source="tokens", paths=(str(local / "part-*"),), vocab_size=VOCAB, eval_fraction=0.0)
  )
  headers = {f"/bucket/corpus/{p.name}" for p in local.glob("*.npy")}
  for i in range(2):
    counts = json.loads((tmp_path / f"counts{i}.json").read_text())
    loader = make_loader(
      prepared,
      split="train",
      seq_len=seq_len,
      global_batch_size=batch,
      seed=0,
      process_index=i,
      process_count=2,
    )
    windows = _host_windows(stream_N, loader, steps + 5)
    # Every .npy header, then its own rows: those of the 3 steps, and some read ahead.
    assert {r[0] for r in counts["reads"] if _is_header(r)} == headers
    split = shards.TokenSplit(
      [
        dataclasses.replace(s, path="gs://bucket/corpus/" + os.path.basename(s.path))
        for s in prepared.train_split.shards
      ]
    )
    _check_reads(
      counts["reads"],
      split,
      [w for batch in windows[:steps] for w in batch],
      [w for batch in windows[steps:] for w in batch],
      seq_len,
    )
    assert sum(counts["bytes_read"].values()) < stream_N.size * 2 / 10


def test_a_saved_loader_state_restores_with_the_shards_elsewhere(tmp_path):
  """The state names shards by file name and length, so another host's copy restores it."""
  stream_N = _write_corpus(tmp_path / "here", 12, seed=10)
  (tmp_path / "there").mkdir()
  for path in (tmp_path / "here").iterdir():
    (tmp_path / "there" / path.name).write_bytes(path.read_bytes())
  args = dict(
    split="train", seq_len=SEQ_LEN, global_batch_size=4, seed=1, process_index=1, process_count=2
  )

  def loader(where: str):
    return make_loader(
      prepare(DataConfig(source="tokens", paths=(str(tmp_path / where / "*"),), vocab_size=VOCAB)),
      **args,
    )

  iterator = iter(loader("here"))
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator)["tokens"] for _ in range(4)]
  restored = iter(loader("there"))
  restored.set_state(state)
  np.testing.assert_array_equal(
    np.stack([next(restored)["tokens"] for _ in range(4)]), np.stack(expected)
  )
  _windows(stream_N, expected[0])
  # A shard of another length makes another stream: the state is refused.
  np.save(tmp_path / "there" / "part-000.npy", np.zeros(5, np.uint16))
  with pytest.raises(ValueError):
    iter(loader("there")).set_state(state)
