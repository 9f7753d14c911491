"""``python -m train.data.prepare``: prepares the token files once and prints what it wrote."""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from train.data import cache
from train.data.config import DataConfig
from train.data.prepare import prepare


def main(argv: Sequence[str] | None = None) -> int:
  defaults = DataConfig()
  parser = argparse.ArgumentParser(prog="python -m train.data.prepare", description=__doc__)
  parser.add_argument("--source", default=defaults.source, choices=("stdlib", "text", "tokens"))
  parser.add_argument("--paths", nargs="*", default=[],
                      help="text files/directories/globs (text) or one .npy (tokens)")
  parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
  parser.add_argument("--max-corpus-bytes", type=int, default=defaults.max_corpus_bytes)
  parser.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction)
  parser.add_argument("--cache-dir", default=None,
                      help="default: $CCE_JAX_CACHE, else ~/.cache/cce_jax")
  args = parser.parse_args(argv)
  cfg = DataConfig(source=args.source, paths=tuple(args.paths), vocab_size=args.vocab_size,
                   max_corpus_bytes=args.max_corpus_bytes, eval_fraction=args.eval_fraction,
                   cache_dir=args.cache_dir)
  built_before = sum(cache.BUILD_COUNTS.values())
  prepared = prepare(cfg)
  built = sum(cache.BUILD_COUNTS.values()) - built_before
  print(f"{'built' if built else 'cached'}: {cfg.resolved_cache_dir()}")
  print(f"  train tokens: {prepared.num_train_tokens:>12,}  {prepared.train_tokens}")
  print(f"  eval tokens:  {prepared.num_eval_tokens:>12,}  {prepared.eval_tokens}")
  print(f"  vocab size:   {prepared.vocab_size:>12,}")
  print(f"  tokenizer:    {prepared.tokenizer_path}")
  tokens_meta = cache.read_entry(pathlib.Path(prepared.train_tokens).parent) or {}
  if prepared.tokenizer_path is not None:
    tokenizer_meta = cache.read_entry(pathlib.Path(prepared.tokenizer_path).parent) or {}
    print(f"  tokenizer trained in {tokenizer_meta.get('train_seconds', float('nan')):.1f} s, "
          f"text encoded in {tokens_meta.get('encode_seconds', float('nan')):.1f} s "
          "(when first built)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
