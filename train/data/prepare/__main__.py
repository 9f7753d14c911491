"""``python -m train.data.prepare [CONFIG.yaml] [key=value ...]``: token shards, or the cache."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Sequence

USAGE = """usage: python -m train.data.prepare [CONFIG.yaml] [key=value ...]

Writes token shards for `data.source: tokens` when `paths` and `out` are given:
  python -m train.data.prepare paths=[corpus/*.jsonl] field=text \\
      tokenizer=tokenizer.json out=gs://bucket/tokens/train
encodes the documents of text files, JSONL (`field`) or Parquet (column `field`; needs
pyarrow, the `data` extra) with the tokenizer (a tokenizers JSON file, or `bpe`: the trainer's
cached BPE of the data.* keys), in parallel (`workers`), into out/shard-00000.npy, ...; a
killed run resumes where it stopped when run again. Train on them with
  data.source=tokens data.paths=[gs://bucket/tokens/train/shard-*.npy] data.vocab_size=V

Otherwise prepares the trainer's cached token files of the `data.*` keys (CONFIG.yaml's data
section with key=value overrides, as `python -m train` takes them), e.g.
  python -m train.data.prepare data.source=text "data.paths=[docs/*.md]" data.vocab_size=8000

Values are YAML (lists in brackets). Exit status 2 names the key of a bad value.
"""


def _split(argv: Sequence[str]) -> tuple[str | None, list[str], dict[str, str]]:
  """(config path, data.* overrides, shard option texts) of the command line."""
  from train.config import ConfigError

  args = list(argv)
  path = args.pop(0) if args and "=" not in args[0] else None
  data_overrides, options = [], {}
  for arg in args:
    key, sep, value = arg.partition("=")
    if not sep or not key:
      raise ConfigError(f"argument {arg!r} is not key=value")
    if key.startswith("data."):
      data_overrides.append(arg)
    else:
      options[key.strip()] = value
  return path, data_overrides, options


def _shard_options(texts: dict[str, str]):
  from train import config as config_lib
  from train.data.prepare.to_shards import ShardOptions

  values = {key: config_lib.parse_override(f"{key}={value}")[1] for key, value in texts.items()}
  if isinstance(values.get("paths"), str):
    values["paths"] = [values["paths"]]
  return config_lib.build(ShardOptions, values)


def _write_shards(options, data_cfg) -> int:
  from train.data.prepare import cached_tokenizer, to_shards

  if options.tokenizer == "bpe":
    path, _ = cached_tokenizer(data_cfg)
    tokenizer_json = pathlib.Path(path).read_text()
  else:
    tokenizer_json = to_shards.load_tokenizer_json(options.tokenizer)
  summary = to_shards.write_shards(options, tokenizer_json)
  earlier = summary.num_shards - summary.num_written
  resumed = f", {earlier} of them by an earlier run" if earlier else ""
  print(
    f"{summary.num_shards} shards in {summary.out}{resumed}: {summary.num_tokens:,} tokens, "
    f"{summary.dtype}, vocabulary {summary.vocab_size:,}"
  )
  print(
    f"train on them with: data.source=tokens "
    f"data.paths=[{summary.out.rstrip('/')}/shard-*.npy] data.vocab_size={summary.vocab_size}"
  )
  return 0


def _prepare_cache(data_cfg) -> int:
  from train.data import cache
  from train.data.prepare import prepare

  built_before = sum(cache.BUILD_COUNTS.values())
  prepared = prepare(data_cfg)
  built = sum(cache.BUILD_COUNTS.values()) - built_before
  print(f"{'built' if built else 'cached'}: {data_cfg.resolved_cache_dir()}")
  print(f"  train tokens: {prepared.num_train_tokens:>12,}  {prepared.train_tokens}")
  print(f"  eval tokens:  {prepared.num_eval_tokens:>12,}  {prepared.eval_tokens}")
  print(f"  vocab size:   {prepared.vocab_size:>12,}")
  print(f"  tokenizer:    {prepared.tokenizer_path}")
  if prepared.tokenizer_path is not None:
    tokens_meta = cache.read_entry(pathlib.Path(prepared.train_tokens).parent) or {}
    tokenizer_meta = cache.read_entry(pathlib.Path(prepared.tokenizer_path).parent) or {}
    print(
      f"  tokenizer trained in {tokenizer_meta.get('train_seconds', float('nan')):.1f} s, "
      f"text encoded in {tokens_meta.get('encode_seconds', float('nan')):.1f} s "
      "(when first built)"
    )
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command; its exit status (2, with one line naming the key, for a bad value)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(arg in ("-h", "--help") for arg in argv):
    from train.config import valid_keys
    from train.data.prepare.to_shards import ShardOptions

    shard_keys = [f.name for f in dataclasses.fields(ShardOptions)]
    data_keys = [k for k in valid_keys() if k.startswith("data.")]
    print(USAGE + "\nshard keys: " + ", ".join(shard_keys) + "\ndata keys: " + ", ".join(data_keys))
    return 0
  from train import config as config_lib

  try:
    path, data_overrides, option_texts = _split(argv)
    data_cfg = config_lib.load(path, data_overrides).data
    if option_texts:
      return _write_shards(_shard_options(option_texts), data_cfg)
    return _prepare_cache(data_cfg)
  except (config_lib.ConfigError, ValueError, OSError) as error:
    print(f"prepare: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
