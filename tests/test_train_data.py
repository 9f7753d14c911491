"""The trainer's data pipeline (``train.data``): config checks, prepare and its cache, the loader.

Loader tests read a token stream ``arange(N)`` (source="tokens"), so every row names the window it
came from: row == arange(w * seq_len, (w + 1) * seq_len) for its window ``w``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from train.data import (
  EOT,
  DataConfig,
  PreparedData,
  cache,
  corpus,
  load_tokenizer,
  make_loader,
  prepare,
)
from train.data import tokenizer as tokenizer_lib
from train.data.prepare.__main__ import main as prepare_main

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=1024, max_corpus_bytes=200_000)
NUM_TOKENS = 10_000
SEQ_LEN = 16


def _take(loader, count: int) -> list[np.ndarray]:
  iterator = iter(loader)
  return [next(iterator)["tokens"] for _ in range(count)]


def _windows(batch_BL: np.ndarray) -> np.ndarray:
  """(B,) window index of each row of an arange-stream batch, after checking each row is one."""
  starts = batch_BL[:, 0]
  assert np.all(starts % SEQ_LEN == 0), starts
  np.testing.assert_array_equal(batch_BL, starts[:, None] + np.arange(SEQ_LEN))
  return starts // SEQ_LEN


@pytest.fixture(scope="module")
def stdlib_small(tmp_path_factory) -> PreparedData:
  return prepare(DataConfig(cache_dir=str(tmp_path_factory.mktemp("cache")), **SMALL))


@pytest.fixture(scope="module")
def arange_data(tmp_path_factory) -> PreparedData:
  """Token stream 0, 1, ..., NUM_TOKENS - 1; the last 10% is the eval split."""
  root = tmp_path_factory.mktemp("arange")
  np.save(root / "stream.npy", np.arange(NUM_TOKENS, dtype=np.int32))
  return prepare(
    DataConfig(
      source="tokens",
      paths=(str(root / "stream.npy"),),
      vocab_size=NUM_TOKENS,
      eval_fraction=0.1,
      cache_dir=str(root / "c"),
    )
  )


# --- DataConfig ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs, field",
  [
    (dict(source="web"), "source"),
    (dict(source=3), "source"),
    (dict(paths=("a.txt",)), "paths"),  # stdlib takes no paths
    (dict(source="text"), "paths"),
    (dict(source="tokens"), "paths"),  # tokens need shards
    (dict(source="tokens", paths=("a.npy",), eval_paths="b.npy"), "eval_paths"),
    (dict(eval_paths=("b.npy",)), "eval_paths"),  # tokens only
    (dict(source="tokens", paths=("a.bin",), bin_dtype="int8"), "bin_dtype"),
    (dict(source="text", paths="a.txt"), "paths"),  # one string, not a sequence of paths
    (dict(vocab_size=256), "vocab_size"),  # below the byte alphabet + EOT
    (dict(vocab_size=2**32 + 1), "vocab_size"),
    (dict(vocab_size=1000.0), "vocab_size"),
    (dict(max_corpus_bytes=0), "max_corpus_bytes"),
    (dict(eval_fraction=1.0), "eval_fraction"),
    (dict(eval_fraction=-0.1), "eval_fraction"),
    (dict(cache_dir=3), "cache_dir"),
    (dict(shuffle=1), "shuffle"),
    (dict(worker_count=-1), "worker_count"),
  ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
  with pytest.raises((TypeError, ValueError), match=rf"DataConfig\.{field}"):
    DataConfig(**kwargs)


def test_config_normalizes_paths_and_cache_dir(tmp_path, monkeypatch):
  cfg = DataConfig(source="text", paths=[tmp_path / "a.txt"], cache_dir=tmp_path)
  assert cfg.paths == (str(tmp_path / "a.txt"),) and cfg.cache_dir == str(tmp_path)
  assert DataConfig(source="tokens", paths=("x.npy",), vocab_size=1).vocab_size == 1
  monkeypatch.setenv("CCE_JAX_CACHE", str(tmp_path / "env"))
  assert DataConfig().resolved_cache_dir() == tmp_path / "env"
  monkeypatch.delenv("CCE_JAX_CACHE")
  assert DataConfig().resolved_cache_dir() == pathlib.Path.home() / ".cache" / "cce_jax"


# --- corpus -------------------------------------------------------------------------------------


def test_stdlib_files_are_sorted_standard_library_sources():
  files = corpus.stdlib_files()
  root = pathlib.Path(__import__("sysconfig").get_paths()["stdlib"])
  names = [f.relative_to(root).as_posix() for f in files]
  assert names == sorted(names) and len(names) > 500
  assert "os.py" in names and "json/__init__.py" in names
  assert not any("site-packages" in n or "dist-packages" in n for n in names)


def test_iter_documents_reads_exactly_the_cap_in_file_order(tmp_path, monkeypatch):
  monkeypatch.setattr(corpus, "CHUNK_BYTES", 8)
  (tmp_path / "a.txt").write_text("line one\nline two\nthree\n")  # 24 bytes
  (tmp_path / "b.txt").write_text("")
  (tmp_path / "c.txt").write_text("héllo\nworld\n")  # 13 bytes
  files = corpus.text_files([str(tmp_path / "*.txt")])
  assert [f.name for f in files] == ["a.txt", "b.txt", "c.txt"]
  pieces = list(corpus.iter_documents(files, 10_000))
  # Pieces end at line ends; the empty file yields nothing; each file's last piece ends it.
  assert all(text.endswith("\n") for text, _ in pieces)
  assert "".join(t for t, _ in pieces) == "line one\nline two\nthree\nhéllo\nworld\n"
  assert [end for _, end in pieces].count(True) == 2 and pieces[-1][1]
  # 26 bytes: all of a.txt, then "h" and half of "é" (replaced by U+FFFD).
  capped = list(corpus.iter_documents(files, 26))
  assert "".join(t for t, _ in capped) == "line one\nline two\nthree\nh\ufffd"
  assert capped[-1][1]  # the cut file still ends its document


def test_text_files_errors_name_paths(tmp_path):
  with pytest.raises(ValueError, match=r"DataConfig\.paths.*nothing-\*\.txt"):
    corpus.text_files([str(tmp_path / "nothing-*.txt")])


# --- tokenizer ----------------------------------------------------------------------------------


def test_tokenizer_round_trips_text(stdlib_small):
  tokenizer = load_tokenizer(stdlib_small)
  assert tokenizer.get_vocab_size() == stdlib_small.vocab_size == 1024
  for text in [
    "def f(x):\n    return x + 1\n",
    "  tabs\tand   spaces \n\n",
    "ünïcödé → 中文 🎉",
    f"a literal {EOT} stays text",
  ]:
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text
    assert tokenizer_lib.eot_id(tokenizer) not in ids
  # BPE learned merges: common code compresses well below one token per byte.
  assert len(tokenizer.encode("import os\nimport sys\n").ids) < 10


def test_text_source_stream_is_documents_joined_by_eot(tmp_path):
  docs = [
    "def alpha():\n    return 1\n" * 20,
    "class Beta:\n    pass\n" * 20,
    f"# the string {EOT} in a file\nx = 'ünï'\n" * 5,
  ]
  for i, doc in enumerate(docs):
    (tmp_path / f"doc{i}.py").write_text(doc)
  cfg = DataConfig(
    source="text",
    paths=(str(tmp_path / "doc*.py"),),
    vocab_size=300,
    eval_fraction=0.1,
    cache_dir=str(tmp_path / "cache"),
  )
  prepared = prepare(cfg)
  tokenizer = load_tokenizer(prepared)
  eot = tokenizer_lib.eot_id(tokenizer)
  expected = np.concatenate([np.r_[tokenizer.encode(doc).ids, eot] for doc in docs])
  train, evals = np.load(prepared.train_tokens), np.load(prepared.eval_tokens)
  assert train.dtype == evals.dtype == np.uint16
  np.testing.assert_array_equal(np.concatenate([train, evals]), expected)
  assert prepared.num_eval_tokens == evals.size == round(expected.size * 0.1)
  assert prepared.num_train_tokens == train.size == expected.size - evals.size
  assert int((expected == eot).sum()) == len(docs)  # the literal in doc 2 is not an EOT


# --- prepare and its cache ----------------------------------------------------------------------


def test_prepare_stdlib_small_writes_the_split_stream(stdlib_small):
  train = np.load(stdlib_small.train_tokens, mmap_mode="r")
  evals = np.load(stdlib_small.eval_tokens, mmap_mode="r")
  assert train.ndim == evals.ndim == 1 and train.dtype == evals.dtype == np.uint16
  assert (train.size, evals.size) == (stdlib_small.num_train_tokens, stdlib_small.num_eval_tokens)
  total = train.size + evals.size
  assert evals.size == round(0.02 * total) > 0
  assert 20_000 < total < 200_000  # 200 kB of source, a few bytes per token
  assert int(max(train.max(), evals.max())) < stdlib_small.vocab_size
  # The stream starts with the first stdlib file.
  decoded = load_tokenizer(stdlib_small).decode(train[:200].tolist())
  assert len(decoded) > 200 and corpus.stdlib_files()[0].read_text().startswith(decoded)


def test_cache_hit_does_not_rebuild(tmp_path):
  cfg = DataConfig(cache_dir=str(tmp_path), **SMALL)
  before = dict(cache.BUILD_COUNTS)
  first = prepare(cfg)
  assert cache.BUILD_COUNTS["tokenizer"] == before.get("tokenizer", 0) + 1
  assert cache.BUILD_COUNTS["tokens"] == before.get("tokens", 0) + 1
  stamps = {p: os.stat(p).st_mtime_ns for p in (first.tokenizer_path, first.train_tokens)}
  again = prepare(cfg)
  assert again == first
  assert cache.BUILD_COUNTS["tokenizer"] == before.get("tokenizer", 0) + 1
  assert cache.BUILD_COUNTS["tokens"] == before.get("tokens", 0) + 1
  assert stamps == {p: os.stat(p).st_mtime_ns for p in stamps}
  # Another eval split re-encodes but reuses the tokenizer.
  other = prepare(DataConfig(cache_dir=str(tmp_path), eval_fraction=0.5, **SMALL))
  assert other.tokenizer_path == first.tokenizer_path and other.train_tokens != first.train_tokens
  assert cache.BUILD_COUNTS["tokenizer"] == before.get("tokenizer", 0) + 1
  assert cache.BUILD_COUNTS["tokens"] == before.get("tokens", 0) + 2
  assert not list(tmp_path.glob(".*tmp-*"))


def test_cache_key_follows_the_text(tmp_path):
  doc = tmp_path / "doc.txt"
  doc.write_text("some text to learn from\n" * 50)
  cfg = DataConfig(source="text", paths=(str(doc),), vocab_size=300, cache_dir=str(tmp_path / "c"))
  first = prepare(cfg)
  doc.write_text("other words entirely now\n" * 50)
  second = prepare(cfg)
  assert second.tokenizer_path != first.tokenizer_path
  decoded = load_tokenizer(second).decode(np.load(second.train_tokens).tolist())
  assert decoded.startswith("other words entirely now\n")
  # A larger vocabulary is another tokenizer, too.
  assert (
    prepare(
      DataConfig(source="text", paths=(str(doc),), vocab_size=320, cache_dir=str(tmp_path / "c"))
    ).tokenizer_path
    != second.tokenizer_path
  )


_CHILD = textwrap.dedent("""
  import json, os, pathlib, sys, time
  from train.data import DataConfig, prepare
  from train.data import cache
  barrier, me = pathlib.Path(sys.argv[1]), sys.argv[2]
  (barrier / me).touch()
  deadline = time.time() + 60
  while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
    time.sleep(0.01)
  prepared = prepare(DataConfig(cache_dir=sys.argv[3], vocab_size=1024, max_corpus_bytes=200_000))
  print(json.dumps({"prepared": prepared.__dict__, "builds": dict(cache.BUILD_COUNTS)}))
""")


def test_concurrent_prepare_builds_once(tmp_path):
  barrier = tmp_path / "barrier"
  barrier.mkdir()
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  children = [
    subprocess.Popen(
      [sys.executable, "-c", _CHILD, str(barrier), name, str(tmp_path / "cache")],
      stdout=subprocess.PIPE,
      env=env,
      text=True,
    )
    for name in ("a", "b")
  ]
  results = []
  for child in children:
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    results.append(json.loads(out.strip().splitlines()[-1]))
  assert results[0]["prepared"] == results[1]["prepared"]
  # Exactly one of the two processes trained the tokenizer and encoded the text.
  for kind in ("tokenizer", "tokens"):
    assert sorted(r["builds"].get(kind, 0) for r in results) == [0, 1], results
  prepared = PreparedData(**results[0]["prepared"])
  assert np.load(prepared.train_tokens).size == prepared.num_train_tokens
  assert load_tokenizer(prepared).get_vocab_size() == 1024
  assert sorted(
    p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")
  ) == ["tokenizer", "tokens"]
  assert not list((tmp_path / "cache").glob(".*tmp-*"))


def test_failed_build_leaves_no_entry(tmp_path):
  def build(out_dir):
    (out_dir / "half.npy").write_bytes(b"half")
    raise ValueError("the build failed")

  with pytest.raises(ValueError, match="the build failed"):
    cache.build_once(tmp_path / "c", "tokens", {"any": 1}, build)
  assert [p for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")] == []


def test_cli_prints_what_it_wrote(tmp_path, capsys):
  (tmp_path / "doc.txt").write_text("words to learn a tokenizer from\n" * 40)
  argv = [
    "data.source=text",
    f"data.paths=[{tmp_path / 'doc.txt'}]",
    "data.vocab_size=300",
    f"data.cache_dir={tmp_path / 'c'}",
  ]
  assert prepare_main(argv) == 0
  out = capsys.readouterr().out
  assert out.startswith("built:") and "train.npy" in out and "tokenizer.json" in out
  assert prepare_main(argv) == 0
  assert capsys.readouterr().out.startswith("cached:")
  assert prepare_main(["data.vocab_size=12"]) == 2
  assert "DataConfig.vocab_size must be in" in capsys.readouterr().err


# --- the loader ---------------------------------------------------------------------------------


def test_rows_are_exact_windows_and_an_epoch_visits_each_once(arange_data):
  num_windows = arange_data.num_train_tokens // SEQ_LEN
  loader = make_loader(
    arange_data, split="train", seq_len=SEQ_LEN, global_batch_size=8, seed=3, num_epochs=1
  )
  batches = [b["tokens"] for b in loader]
  assert len(batches) == num_windows // 8
  assert all(b.shape == (8, SEQ_LEN) and b.dtype == np.int32 for b in batches)
  windows = np.concatenate([_windows(b) for b in batches])
  assert len(set(windows.tolist())) == windows.size  # no window twice in an epoch
  assert windows.max() < num_windows  # the tail shorter than a window is never served
  assert not np.all(np.diff(windows) > 0)  # shuffled


def test_epochs_reshuffle_and_unshuffled_is_in_order(arange_data):
  per_epoch = arange_data.num_train_tokens // SEQ_LEN // 8
  two = [
    _windows(b["tokens"])
    for b in make_loader(
      arange_data, split="train", seq_len=SEQ_LEN, global_batch_size=8, seed=0, num_epochs=2
    )
  ]
  assert len(two) == 2 * per_epoch
  first, second = np.concatenate(two[:per_epoch]), np.concatenate(two[per_epoch:])
  assert not np.array_equal(first, second)
  ordered = make_loader(
    arange_data, split="train", seq_len=SEQ_LEN, global_batch_size=8, seed=0, shuffle=False
  )
  np.testing.assert_array_equal(
    np.concatenate([_windows(b) for b in _take(ordered, 3)]), np.arange(24)
  )


def test_eval_and_train_are_disjoint(arange_data):
  num_train = arange_data.num_train_tokens
  assert arange_data.num_eval_tokens == NUM_TOKENS // 10
  train = make_loader(
    arange_data, split="train", seq_len=SEQ_LEN, global_batch_size=4, seed=0, num_epochs=1
  )
  evals = make_loader(
    arange_data, split="eval", seq_len=SEQ_LEN, global_batch_size=4, seed=0, num_epochs=1
  )
  assert max(int(b["tokens"].max()) for b in train) < num_train
  eval_batches = [b["tokens"] for b in evals]
  assert len(eval_batches) == arange_data.num_eval_tokens // SEQ_LEN // 4
  assert min(int(b.min()) for b in eval_batches) >= num_train
  for batch in eval_batches:  # eval windows are seq_len slices of the eval stream
    np.testing.assert_array_equal(
      (batch - num_train) % SEQ_LEN, np.tile(np.arange(SEQ_LEN), (4, 1))
    )


def test_same_seed_same_batches_other_seed_other_batches(arange_data):
  args = dict(split="train", seq_len=SEQ_LEN, global_batch_size=8)
  a = _take(make_loader(arange_data, seed=7, **args), 5)
  b = _take(make_loader(arange_data, seed=7, **args), 5)
  c = _take(make_loader(arange_data, seed=8, **args), 5)
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_concatenate_to_the_global_batch(arange_data, process_count):
  args = dict(split="train", seq_len=SEQ_LEN, global_batch_size=8, seed=11)
  per_epoch = arange_data.num_train_tokens // SEQ_LEN // 8
  steps = per_epoch + 3  # across an epoch boundary
  whole = _take(make_loader(arange_data, **args), steps)
  shards = [
    _take(make_loader(arange_data, process_index=p, process_count=process_count, **args), steps)
    for p in range(process_count)
  ]
  for step in range(steps):
    assert all(s[step].shape == (8 // process_count, SEQ_LEN) for s in shards)
    np.testing.assert_array_equal(np.concatenate([s[step] for s in shards]), whole[step])


@pytest.mark.parametrize("process_index, process_count", [(0, 1), (1, 2)])
def test_restored_iterator_resumes_exactly(arange_data, process_index, process_count):
  args = dict(
    split="train",
    seq_len=SEQ_LEN,
    global_batch_size=8,
    seed=5,
    process_index=process_index,
    process_count=process_count,
  )
  per_epoch = arange_data.num_train_tokens // SEQ_LEN // 8
  iterator = iter(make_loader(arange_data, **args))
  for _ in range(per_epoch - 2):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator)["tokens"] for _ in range(5)]  # crosses into the next epoch
  restored = iter(make_loader(arange_data, **args))
  restored.set_state(state)
  np.testing.assert_array_equal(
    np.stack([next(restored)["tokens"] for _ in range(5)]), np.stack(expected)
  )
  # The state is plain JSON bytes and refuses a loader with another order.
  assert json.loads(state)["sampler"].startswith("EpochSampler(")
  other = iter(make_loader(arange_data, **{**args, "seed": 6}))
  with pytest.raises(ValueError, match="Sampler"):
    other.set_state(state)


def test_worker_processes_serve_the_same_batches(arange_data):
  args = dict(split="train", seq_len=SEQ_LEN, global_batch_size=8, seed=2)
  in_process = _take(make_loader(arange_data, **args), 4)
  iterator = iter(make_loader(arange_data, worker_count=1, **args))
  batches = [next(iterator)["tokens"] for _ in range(2)]
  state = iterator.get_state()
  batches += [next(iterator)["tokens"] for _ in range(2)]
  np.testing.assert_array_equal(np.stack(batches), np.stack(in_process))
  restored = iter(make_loader(arange_data, worker_count=1, **args))
  restored.set_state(state)
  np.testing.assert_array_equal(next(restored)["tokens"], in_process[2])


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(split="test"), "split"),
    (dict(seq_len=0), "seq_len"),
    (dict(global_batch_size=0), "global_batch_size"),
    (dict(global_batch_size=6, process_count=4), "global_batch_size"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(process_count=0), "process_count"),
    (dict(seed=-1), "seed"),
    (dict(num_epochs=0), "num_epochs"),
    (dict(worker_count=-1), "worker_count"),
    (dict(split="eval", seq_len=NUM_TOKENS // 10 + 1), "seq_len"),  # eval shorter than a row
    (dict(split="eval", seq_len=SEQ_LEN, global_batch_size=1000), "global_batch_size"),
  ],
)
def test_make_loader_rejects_bad_arguments_naming_them(arange_data, kwargs, name):
  args = dict(split="train", seq_len=SEQ_LEN, global_batch_size=8, seed=0) | kwargs
  with pytest.raises((TypeError, ValueError), match=rf"`{name}`"):
    make_loader(arange_data, **args)


# --- the default corpus -------------------------------------------------------------------------


def test_default_config_prepares_the_stdlib_with_32k_vocabulary(tmp_path):
  """The real default (8 MB of stdlib source, 32k BPE): about 10 s on 2 cores."""
  prepared = prepare(DataConfig(cache_dir=str(tmp_path)))
  assert prepared.vocab_size == 32_000
  assert prepared.num_train_tokens > 1_000_000
  assert prepared.num_eval_tokens == pytest.approx(
    0.02 * (prepared.num_train_tokens + prepared.num_eval_tokens), abs=1
  )
  meta = cache.read_entry(pathlib.Path(prepared.tokenizer_path).parent)
  assert meta["description"]["vocab_size"] == 32_000 and meta["train_seconds"] > 0
  batch = next(iter(make_loader(prepared, split="train", seq_len=512, global_batch_size=4, seed=0)))
  assert batch["tokens"].shape == (4, 512) and int(batch["tokens"].max()) < 32_000
