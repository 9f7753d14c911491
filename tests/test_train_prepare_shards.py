"""`python -m train.data.prepare paths=... out=...`: text, JSONL, Parquet to token shards.

The reference stream is each document encoded on its own by the same tokenizer
(`tokenizer.encode(text).ids`), followed by the end-of-text id, in input order.
"""

from __future__ import annotations

import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import gcs_testing
import numpy as np
import pytest
import train_testing

from train.data import DataConfig, make_loader, prepare
from train.data import tokenizer as tokenizer_lib
from train.data.prepare.__main__ import main as prepare_main

WORDS = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta\n", "η", "theta", "<|endoftext|>"]


def _text(rng: np.random.Generator) -> str:
  return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 60))).tolist())


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> pathlib.Path:
  """A small byte-level BPE saved as a Hugging Face tokenizer.json."""
  rng = np.random.default_rng(0)
  tokenizer = tokenizer_lib.train_tokenizer([_text(rng) for _ in range(200)], 300)
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
  tokenizer.save(str(path))
  return path


def _reference(tokenizer_file: pathlib.Path, texts: list[str]) -> np.ndarray:
  tokenizer = tokenizer_lib.load(str(tokenizer_file))
  eot = tokenizer_lib.eot_id(tokenizer)
  return np.concatenate(
    [np.r_[tokenizer.encode(t, add_special_tokens=False).ids, eot] for t in texts]
  ).astype(np.int64)


def _jsonl_corpus(directory: pathlib.Path, files: int, lines: int, seed: int) -> list[str]:
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  texts = []
  for f in range(files):
    records = [{"id": i, "body": _text(rng)} for i in range(lines)]
    with open(directory / f"part-{f}.jsonl", "w") as out:
      for record in records:
        out.write(json.dumps(record) + "\n")
        if record["id"] % 7 == 3:
          out.write("\n")  # blank lines are skipped
    texts += [r["body"] for r in records]
  return texts


def _stream(out: pathlib.Path) -> np.ndarray:
  return np.concatenate([np.load(p) for p in sorted(out.glob("shard-*.npy"))]).astype(np.int64)


def test_jsonl_to_shards_in_parallel_and_train_on_them(tmp_path, tokenizer_file, capsys):
  texts = _jsonl_corpus(tmp_path / "raw", files=3, lines=150, seed=1)
  out = tmp_path / "tokens"
  argv = [
    f"paths=[{tmp_path / 'raw'}/*.jsonl]",
    "field=body",
    f"tokenizer={tokenizer_file}",
    f"out={out}",
    "workers=2",
    "shard_mb=0.004",
    "progress=false",
  ]
  assert prepare_main(argv) == 0
  printed = capsys.readouterr().out
  shards = sorted(out.glob("shard-*.npy"))
  assert len(shards) > 6  # several ranges per file
  assert all(np.load(p).dtype == np.uint16 for p in shards)
  reference = _reference(tokenizer_file, texts)
  np.testing.assert_array_equal(_stream(out), reference)
  assert f"{len(shards)} shards" in printed and f"{reference.size:,} tokens" in printed
  assert f"data.paths=[{out}/shard-*.npy]" in printed
  # The trainer's tokens source serves windows of exactly that stream.
  prepared = prepare(
    DataConfig(
      source="tokens",
      paths=(str(out),),  # the folder: its shards
      vocab_size=300,
      eval_fraction=0.0,
    )
  )
  assert [s.path for s in prepared.train_split.shards] == [str(p) for p in shards]
  batch = next(
    iter(
      make_loader(prepared, split="train", seq_len=50, global_batch_size=3, seed=0, shuffle=False)
    )
  )["tokens"]
  np.testing.assert_array_equal(batch, reference[:150].reshape(3, 50))


def test_text_files_are_one_document_each_grouped_into_shards(tmp_path, tokenizer_file):
  rng = np.random.default_rng(2)
  texts = [_text(rng) * int(rng.integers(1, 20)) for _ in range(9)]
  for i, text in enumerate(texts):
    (tmp_path / "raw" / f"{i // 4}").mkdir(parents=True, exist_ok=True)
    (tmp_path / "raw" / f"{i // 4}" / f"doc{i}.txt").write_text(text)
  out = tmp_path / "tokens"
  assert (
    prepare_main(
      [
        f"paths=[{tmp_path / 'raw'}]",
        f"tokenizer={tokenizer_file}",
        f"out={out}",
        "workers=1",
        "shard_mb=0.002",
        "progress=false",
      ]
    )
    == 0
  )
  assert 1 < len(list(out.glob("shard-*.npy"))) < 9
  order = sorted(range(9), key=lambda i: f"{i // 4}/doc{i}.txt")
  np.testing.assert_array_equal(_stream(out), _reference(tokenizer_file, [texts[i] for i in order]))


def test_a_killed_run_resumes_where_it_stopped(tmp_path, tokenizer_file):
  texts = _jsonl_corpus(tmp_path / "raw", files=1, lines=1500, seed=3)
  out = tmp_path / "tokens"
  argv = [
    f"paths=[{tmp_path / 'raw'}/*.jsonl]",
    "field=body",
    f"tokenizer={tokenizer_file}",
    f"out={out}",
    "workers=1",
    "shard_mb=0.001",
    "progress=false",
  ]
  process = subprocess.Popen(
    [sys.executable, "-m", "train.data.prepare", *argv],
    cwd=train_testing.ROOT,
    env=train_testing.subprocess_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )
  deadline = time.monotonic() + 120
  while len(list(out.glob("shard-*.npy"))) < 3 and time.monotonic() < deadline:
    assert process.poll() is None, process.stdout.read()
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy")}
  total = json.loads((out / "plan.json").read_text())["units"]
  assert 3 <= len(before) < len(total), "the run was not interrupted"
  (out / "shard-99999.npy.tmp-1").write_bytes(b"half a shard")  # as a kill mid-write leaves
  assert prepare_main(argv) == 0
  after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npy")}
  assert len(after) == len(total)
  assert all(after[name] == stamp for name, stamp in before.items())  # not encoded again
  assert not list(out.glob("*.tmp-*"))
  np.testing.assert_array_equal(_stream(out), _reference(tokenizer_file, texts))


def test_other_inputs_into_the_same_out_are_refused(tmp_path, tokenizer_file, capsys):
  _jsonl_corpus(tmp_path / "a", files=1, lines=20, seed=4)
  _jsonl_corpus(tmp_path / "b", files=1, lines=20, seed=5)
  common = [
    "field=body",
    f"tokenizer={tokenizer_file}",
    f"out={tmp_path / 'out'}",
    "workers=1",
    "progress=false",
  ]
  assert prepare_main([f"paths=[{tmp_path / 'a'}/*.jsonl]", *common]) == 0
  assert prepare_main([f"paths=[{tmp_path / 'b'}/*.jsonl]", *common]) == 2
  assert "plan.json differs" in capsys.readouterr().err


def test_bpe_tokenizer_is_the_trainers_cached_one(tmp_path):
  (tmp_path / "corpus.txt").write_text("the trainer's own text, learned by its BPE\n" * 40)
  _jsonl_corpus(tmp_path / "raw", files=1, lines=30, seed=6)
  data_keys = [
    "data.source=text",
    f"data.paths=[{tmp_path / 'corpus.txt'}]",
    "data.vocab_size=280",
    f"data.cache_dir={tmp_path / 'cache'}",
  ]
  assert (
    prepare_main(
      [
        f"paths=[{tmp_path / 'raw'}/part-0.jsonl]",
        "field=body",
        "tokenizer=bpe",
        f"out={tmp_path / 'out'}",
        "workers=1",
        "progress=false",
        *data_keys,
      ]
    )
    == 0
  )
  (tokenizer_json,) = (tmp_path / "cache").glob("tokenizer-*/tokenizer.json")
  texts = [
    json.loads(line)["body"]
    for line in (tmp_path / "raw" / "part-0.jsonl").read_text().splitlines()
    if line
  ]
  np.testing.assert_array_equal(_stream(tmp_path / "out"), _reference(tokenizer_json, texts))


def test_parquet_row_groups_become_shards(tmp_path, tokenizer_file):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  rng = np.random.default_rng(7)
  texts = [_text(rng) for _ in range(70)]
  table = pa.table({"id": list(range(70)), "content": texts})
  pq.write_table(table, tmp_path / "data.parquet", row_group_size=20)
  out = tmp_path / "tokens"
  assert (
    prepare_main(
      [
        f"paths=[{tmp_path / 'data.parquet'}]",
        "field=content",
        f"tokenizer={tokenizer_file}",
        f"out={out}",
        "workers=1",
        "progress=false",
      ]
    )
    == 0
  )
  assert len(list(out.glob("shard-*.npy"))) == 4  # one per row group
  np.testing.assert_array_equal(_stream(out), _reference(tokenizer_file, texts))
  assert (
    prepare_main(
      [
        f"paths=[{tmp_path / 'data.parquet'}]",
        "field=body",
        f"tokenizer={tokenizer_file}",
        f"out={tmp_path / 'o2'}",
        "workers=1",
        "progress=false",
      ]
    )
    == 2
  )


def test_shards_on_gcs_from_inputs_on_gcs(tmp_path, tokenizer_file, monkeypatch):
  monkeypatch.setenv("EPATH_USE_TF", "false")  # put back after the test (install sets it)
  gcs = gcs_testing.install(monkeypatch.setitem)
  texts = _jsonl_corpus(tmp_path / "raw", files=2, lines=60, seed=8)
  gcs_testing.upload(tmp_path / "raw", "gs://bucket/raw")
  assert (
    prepare_main(
      [
        "paths=[gs://bucket/raw/*.jsonl]",
        "field=body",
        f"tokenizer={tokenizer_file}",
        "out=gs://bucket/tokens",
        "workers=1",
        "shard_mb=0.003",
        "progress=false",
      ]
    )
    == 0
  )
  names = sorted(n for n in gcs.store if n.startswith("/bucket/tokens/shard-"))
  assert len(names) > 2
  prepared = prepare(
    DataConfig(
      source="tokens",
      paths=("gs://bucket/tokens",),  # the folder
      vocab_size=300,
      eval_fraction=0.0,
    )
  )
  assert len(prepared.train_split.shards) == len(names)
  reference = _reference(tokenizer_file, texts)
  assert prepared.num_train_tokens == reference.size
  np.testing.assert_array_equal(prepared.train_split.read(0, reference.size), reference)
  gcs_testing.clear_epath_filesystems()


@pytest.mark.parametrize(
  "args, message",
  [
    (["field=title"], "field='title'"),
    (["eot=</s>"], r"eot='</s>' is not a token"),
    (["workers=0"], "workers must be"),
    (["shard_mb=-1"], "shard_mb must be"),
    (["format=csv"], "format must be one of"),
    (["colour=red"], r"unknown config key\(s\) \['colour'\]"),
    (["paths=[/nowhere/*.jsonl]"], r"paths entry '/nowhere/\*\.jsonl' matches no file"),
    (["tokenizer=/nowhere/tokenizer.json"], "tokenizer='/nowhere/tokenizer.json'"),
  ],
)
def test_bad_values_are_one_line_naming_the_key(tmp_path, tokenizer_file, capsys, args, message):
  _jsonl_corpus(tmp_path / "raw", files=1, lines=10, seed=9)
  argv = [
    f"paths=[{tmp_path / 'raw'}/*.jsonl]",
    "field=body",
    f"tokenizer={tokenizer_file}",
    f"out={tmp_path / 'out'}",
    "workers=1",
    "progress=false",
  ]
  keys = {a.split("=")[0] for a in args}
  argv = [a for a in argv if a.split("=")[0] not in keys] + args
  assert prepare_main(argv) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1, err
  assert err.startswith("prepare: error:")
  assert re.search(message, err), err


def test_help_lists_the_keys():
  result = subprocess.run(
    [sys.executable, "-m", "train.data.prepare", "--help"],
    cwd=train_testing.ROOT,
    env=train_testing.subprocess_env(),
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0
  for key in ("paths", "out", "field", "tokenizer", "workers", "shard_mb", "data.vocab_size"):
    assert key in result.stdout
