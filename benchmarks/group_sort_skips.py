"""What sorting the vocabulary by aligned groups of classes costs in skipped backward tiles.

The TPU kernels read the classifier ``c`` (V, D) in the vocabulary sort's order by DMA, one
group of ``G`` consecutive rows (whole (16, 128) HBM tiles of bf16) at a time, so the order
they can follow moves whole groups: ``cce_jax.vocab_sort.vocab_order(group_size=G)`` ranks the
groups by their best average logit. This script measures, on the synthetic trained-like logits
of ``cce_jax.synthetic`` (CPU, float32), the fraction of (token block x vocabulary block)
tiles the backward skips (``cce_jax.filtering.skip_table``, the bfloat16 default
``filter_eps`` of 2**-12, the mean reduction's filter scale of 1) with no sort, the per-class
sort, and the group sort for each ``G``, at the backward's tile sizes:

  JAX_PLATFORMS=cpu python benchmarks/group_sort_skips.py --shape 1024,256,131072

``--hot`` adds a hybrid order that the kernels do not implement (the hottest classes one by
one in a small gathered copy, then the groups), to size what a follow-up could win back.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from cce_jax import filtering, synthetic
from cce_jax.column_slabs import slab_order

FILTER_EPS = 2.0**-12  # "auto" for bfloat16 inputs: finfo(bfloat16).eps / 32


def skipped_fraction(
  logits: jax.Array,  # (N, V) f32
  lse: jax.Array,  # (N,) f32
  labels: jax.Array,  # (N,) int32
  order: jax.Array | None,  # (V,) int32
  token_block: int,
  vocab_block: int,
) -> float:
  """The fraction of tiles ``filtering.skip_table`` skips with the classes in ``order``."""
  num_tokens, num_classes = logits.shape
  tokens = filtering.AxisTiling(num_tokens, token_block, "mask")
  classes = filtering.AxisTiling(num_classes, vocab_block, "mask")
  visited = logits if order is None else jnp.take(logits, order, axis=1)
  pad = classes.count * vocab_block - num_classes
  visited = jnp.pad(visited, ((0, 0), (0, pad)), constant_values=-jnp.inf)
  block_max = jnp.max(visited.reshape(num_tokens, classes.count, vocab_block), axis=2)
  skip = filtering.skip_table(
    block_max,
    lse,
    jnp.ones_like(lse),
    labels,
    order,
    tokens,
    classes,
    FILTER_EPS,
    block_max_token_axis=0,
  )
  return float(jnp.mean(skip))


def hot_then_groups_fraction(
  logits: jax.Array,  # (N, V) f32
  lse: jax.Array,  # (N,) f32
  labels: jax.Array,  # (N,) int32
  score: jax.Array,  # (V,) f32
  hot: int,
  group: int,
  token_block: int,
  vocab_block: int,
) -> float:
  """The skipped fraction of a hybrid order (not implemented in the kernels): the ``hot``
  best-scoring classes one by one first (a small gathered copy), then every group of ``group``
  rows by its best score with the hot classes masked out of it (V + hot positions in all; a
  masked position has no logit and is nobody's target)."""
  num_tokens, num_classes = logits.shape
  hot_ids = jnp.argsort(-score, stable=True)[:hot].astype(jnp.int32)
  is_hot = jnp.zeros((num_classes,), bool).at[hot_ids].set(True)
  rest = slab_order(jnp.where(is_hot, -jnp.inf, score), group)
  visited = jnp.concatenate(
    [logits[:, hot_ids], jnp.where(is_hot[rest][None, :], -jnp.inf, logits[:, rest])], axis=1
  )
  order = jnp.concatenate([hot_ids, rest])  # positions -> class (hot classes twice)
  tokens = filtering.AxisTiling(num_tokens, token_block, "mask")
  classes = filtering.AxisTiling(order.shape[0], vocab_block, "mask")
  pad = classes.count * vocab_block - order.shape[0]
  visited = jnp.pad(visited, ((0, 0), (0, pad)), constant_values=-jnp.inf)
  block_max = jnp.max(visited.reshape(num_tokens, classes.count, vocab_block), axis=2)
  position = jnp.zeros((num_classes,), jnp.int32).at[rest].set(hot + jnp.arange(num_classes))
  position = position.at[hot_ids].set(jnp.arange(hot, dtype=jnp.int32))
  # skip_table maps labels through the order's inverse; give it positions directly.
  skip = filtering.skip_table(
    block_max,
    lse,
    jnp.ones_like(lse),
    position[labels],
    None,
    tokens,
    classes,
    FILTER_EPS,
    block_max_token_axis=0,
  )
  return float(jnp.mean(skip))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="1024,256,131072", help="N,D,V")
  parser.add_argument("--groups", default="8,16,32,64,128", help="group sizes G")
  parser.add_argument(
    "--tiles", default="128x2048,128x4096,512x2048", help="token_block x vocab_block, ..."
  )
  parser.add_argument(
    "--hot", default="", help="also hybrid orders with these many hot classes first, e.g. 4096"
  )
  args = parser.parse_args(argv)
  n, d, v = (int(x) for x in args.shape.split(","))
  e, c, labels = synthetic.trained_like_inputs(jax.random.key(0), n, d, v)
  logits = jnp.dot(e, c.T, precision=jax.lax.Precision.HIGHEST)  # (N, V) f32
  lse = jax.nn.logsumexp(logits, axis=1)
  score = jnp.dot(c, jnp.mean(e, axis=0), precision=jax.lax.Precision.HIGHEST)  # (V,)
  orders = {"no sort": None, "per class": jnp.argsort(-score, stable=True).astype(jnp.int32)}
  for g in (int(x) for x in args.groups.split(",")):
    orders[f"G = {g}"] = slab_order(score, g)
  tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles.split(",")]
  print(f"N={n}, D={d}, V={v}, trained-like logits, filter_eps=2**-12: skipped tiles")
  print("| order | " + " | ".join(f"{bn} x {bv}" for bn, bv in tiles) + " |")
  print("|---|" + "---:|" * len(tiles))
  for name, order in orders.items():
    cells = [skipped_fraction(logits, lse, labels, order, bn, bv) for bn, bv in tiles]
    print(f"| {name} | " + " | ".join(f"{100 * x:.1f}%" for x in cells) + " |", flush=True)
  for hot in (int(x) for x in args.hot.split(",") if x):
    cells = [
      hot_then_groups_fraction(logits, lse, labels, score, hot, 16, bn, bv) for bn, bv in tiles
    ]
    name = f"{hot} hot classes, then G = 16"
    print(f"| {name} | " + " | ".join(f"{100 * x:.1f}%" for x in cells) + " |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
