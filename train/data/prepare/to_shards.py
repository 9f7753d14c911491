"""Text, JSONL or Parquet in, token shards out (for `data.source: tokens`), in parallel, resumable.

The input is cut into units (`documents.plan`); unit `i` becomes `<out>/shard-<i:05d>.npy`, a
1-D uint16 (vocabulary <= 65536) or uint32 array: each document's tokens followed by the
end-of-text id. A shard is written whole under a temporary name and renamed (on Cloud Storage
an object appears only once uploaded), so a killed run leaves only finished shards; run the
same command again and it encodes the missing ones. `<out>/plan.json` records the inputs, the
tokenizer and the units, so a rerun with other inputs into the same `out` is refused instead of
mixing two corpora.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
from etils import epath

from train.data import shards as shards_lib
from train.data.prepare import documents
from train.data.tokenizer import EOT

# Documents handed to one `encode_batch` call (tokenizers parallelizes over them).
_ENCODE_BATCH = 64
PLAN_FILE = "plan.json"


def _is_int(value: object) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class ShardOptions:
  """The `key=value` options of `python -m train.data.prepare` that write shards.

  Raises:
    ValueError naming the key for a bad value (from `__post_init__`).
  """

  # Input files, directories or globs ("**" allowed), local or URLs (gs://bucket/raw/*.jsonl).
  paths: tuple[str, ...] = ()
  # The folder the shards go to, local or a URL (gs://bucket/tokens).
  out: str = ""
  # "text" (each file one document), "jsonl" (each line one document), "parquet" (each row);
  # null: from each file's suffix (.jsonl, .parquet, anything else text).
  format: str | None = None
  # The JSONL field or Parquet column that holds the text.
  field: str = "text"
  # "bpe": the trainer's cached byte-level BPE of the `data.*` keys (the stdlib corpus by
  # default, `data.vocab_size` entries); else a Hugging Face `tokenizers` tokenizer.json (path
  # or URL).
  tokenizer: str = "bpe"
  # The end-of-text token written after every document (must be in the tokenizer).
  eot: str = EOT
  # Encoding processes (null: one per CPU core).
  workers: int | None = None
  # Input megabytes per shard (about; a text file or a Parquet row group is never split).
  shard_mb: float = 64.0
  # A progress bar on stderr.
  progress: bool = True

  def __post_init__(self):
    if not self.paths:
      raise ValueError(
        "paths must name at least one input file or glob, e.g. paths=[corpus/*.jsonl]"
      )
    if not isinstance(self.out, str) or not self.out:
      raise ValueError("out must name the shard folder, e.g. out=gs://bucket/tokens")
    if self.format is not None and self.format not in documents.FORMATS:
      raise ValueError(f"format must be one of {documents.FORMATS} or null, got {self.format!r}")
    if not isinstance(self.field, str) or not self.field:
      raise ValueError(f"field must name the text field, got {self.field!r}")
    if not isinstance(self.tokenizer, str) or not self.tokenizer:
      raise ValueError(f"tokenizer must be 'bpe' or a tokenizer.json, got {self.tokenizer!r}")
    if self.workers is not None and (not _is_int(self.workers) or self.workers < 1):
      raise ValueError(f"workers must be an int >= 1 or null, got {self.workers!r}")
    if (
      isinstance(self.shard_mb, bool)
      or not isinstance(self.shard_mb, int | float)
      or (self.shard_mb <= 0)
    ):
      raise ValueError(f"shard_mb must be a number > 0, got {self.shard_mb!r}")


@dataclasses.dataclass(frozen=True)
class Summary:
  """What `write_shards` left in `out`."""

  out: str
  num_shards: int
  # Shards encoded by this call (the others were there from an earlier, interrupted run).
  num_written: int
  num_tokens: int
  vocab_size: int
  dtype: str


def shard_name(index: int) -> str:
  return f"shard-{index:05d}.npy"


def load_tokenizer_json(spec: str) -> str:
  """The JSON text of the tokenizer file `spec` (local path or URL).

  Raises:
    ValueError naming `tokenizer` when the file is missing or not a tokenizer.
  """
  from tokenizers import Tokenizer

  try:
    with documents._open(spec) as f:
      text = f.read().decode()
    Tokenizer.from_str(text)
  except Exception as error:
    raise ValueError(f"tokenizer={spec!r}: not a readable tokenizers JSON file ({error})") from None
  return text


# One encoding process's tokenizer (set by `_start_worker`, read by `_encode_unit`).
_WORKER: dict = {}


def _start_worker(tokenizer_json: str, eot: str, dtype: str, out: str, field: str) -> None:
  from tokenizers import Tokenizer

  tokenizer = Tokenizer.from_str(tokenizer_json)
  tokenizer.encode_special_tokens = True  # a literal "<|endoftext|>" in a text stays text
  _WORKER.update(
    tokenizer=tokenizer, eot=tokenizer.token_to_id(eot), dtype=np.dtype(dtype), out=out, field=field
  )


def _encode(unit: documents.Unit) -> Iterator[np.ndarray]:
  tokenizer, eot = _WORKER["tokenizer"], np.array([_WORKER["eot"]], np.int64)
  batch: list[str] = []
  texts = documents.documents(unit, _WORKER["field"])
  while True:
    batch = [text for _, text in zip(range(_ENCODE_BATCH), texts, strict=False)]
    if not batch:
      return
    for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
      yield np.asarray(encoding.ids, np.int64)
      yield eot


def _write_npy(target: str, array: np.ndarray) -> None:
  """Writes `array` as .npy to `target` so that it appears only complete."""
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  if shards_lib.is_url(target):  # an object store shows an object only once it is uploaded
    epath.Path(target).write_bytes(buffer.getvalue())
    return
  temporary = f"{target}.tmp-{os.getpid()}"
  with open(temporary, "wb") as f:
    f.write(buffer.getvalue())
  os.replace(temporary, target)


def _encode_unit(unit: documents.Unit) -> tuple[int, int]:
  """Encodes one unit into its shard; (unit index, tokens written)."""
  pieces = list(_encode(unit))
  tokens_N = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)  # (N,)
  _write_npy(f"{_WORKER['out']}/{shard_name(unit.index)}", tokens_N.astype(_WORKER["dtype"]))
  return unit.index, int(tokens_N.size)


def _plan_record(
  options: ShardOptions, files: Sequence[str], units: Sequence[documents.Unit], tokenizer_json: str
) -> dict:
  return {
    "inputs": [{"path": f, "size": documents._size(f)} for f in files],
    "format": options.format,
    "field": options.field,
    "eot": options.eot,
    "shard_mb": options.shard_mb,
    "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
    "units": [dataclasses.asdict(u) for u in units],
  }


def _check_plan(out: epath.Path, record: dict) -> None:
  """Writes `plan.json`, or checks that the one there (from an earlier run) is the same."""
  path = out / PLAN_FILE
  text = json.dumps(record, indent=1, sort_keys=True)
  if path.exists():
    if json.loads(path.read_text()) != json.loads(text):
      raise ValueError(
        f"out={str(out)!r} holds shards of other inputs or another tokenizer "
        f"({PLAN_FILE} differs); choose a new out or empty it"
      )
    return
  path.write_text(text)


def write_shards(options: ShardOptions, tokenizer_json: str) -> Summary:
  """Encodes `options.paths` with the tokenizer into shards in `options.out` (see the module).

  Skips the shards an earlier run finished. Workers are spawned processes (`options.workers`,
  default one per core), each loading the tokenizer once.

  Raises:
    ValueError naming the key: inputs that match nothing, an `eot` the tokenizer lacks, a
    JSONL line or Parquet file without `field`, an `out` holding another corpus's shards.
  """
  from tokenizers import Tokenizer
  from tqdm import tqdm

  tokenizer = Tokenizer.from_str(tokenizer_json)
  if tokenizer.token_to_id(options.eot) is None:
    raise ValueError(
      f"eot={options.eot!r} is not a token of tokenizer={options.tokenizer!r}; "
      "set eot= to its end-of-text token (e.g. eot='<|end_of_text|>')"
    )
  vocab_size = tokenizer.get_vocab_size()
  dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
  files = documents.expand_inputs(options.paths)
  units = documents.plan(files, options.format, int(options.shard_mb * 2**20))
  out = epath.Path(options.out)
  out.mkdir(parents=True, exist_ok=True)
  _check_plan(out, _plan_record(options, files, units, tokenizer_json))
  if not shards_lib.is_url(options.out):  # leftovers of a killed run
    for leftover in pathlib.Path(options.out).glob("shard-*.npy.tmp-*"):
      leftover.unlink()
  done = {p.name for p in out.glob("shard-*.npy")}
  todo = [u for u in units if shard_name(u.index) not in done]
  workers = min(options.workers or os.cpu_count() or 1, max(len(todo), 1))
  init_args = (tokenizer_json, options.eot, dtype.name, options.out.rstrip("/"), options.field)
  bar = tqdm(
    total=len(units),
    initial=len(units) - len(todo),
    unit="shard",
    disable=not options.progress,
    desc="shards",
  )
  try:
    if workers == 1:
      _start_worker(*init_args)
      for unit in todo:
        _encode_unit(unit)
        bar.update()
    else:
      context = multiprocessing.get_context("spawn")
      with context.Pool(workers, initializer=_start_worker, initargs=init_args) as pool:
        for _ in pool.imap_unordered(_encode_unit, todo):
          bar.update()
  finally:
    bar.close()
  written = shards_lib.open_shards(
    [f"{options.out.rstrip('/')}/{shard_name(u.index)}" for u in units], "uint16", "out"
  )
  return Summary(
    out=options.out,
    num_shards=len(units),
    num_written=len(todo),
    num_tokens=sum(s.num_tokens for s in written),
    vocab_size=vocab_size,
    dtype=dtype.name,
  )
