"""What the per-tile reductions of the loss forward and of ``token_stats`` cost on this CPU.

Both forwards multiply one token block by one classifier tile and reduce the (n, v) f32 tile
of logits into running per-token values:

* the loss forward (``cce_jax.filtering.online_lse_step``): the row maximum and
  ``sum exp(z - m)``, for the log-sum-exp;
* ``token_stats`` (``cce_jax.local_stats.online_stats_step``): the same two, the argmax, and
  ``sum exp(z - m) (z - m)`` for the entropy: a second exp-weighted sum over every entry.

The script times, per tile and at each tile shape, three loops over ``--tiles`` tiles: the
tile product alone (``cce_jax.tile_dot.tile_dot``, float32 accumulation, kept alive by a row
maximum), and each forward's reductions alone over stored f32 tiles of the same logits, read
from the cache as a tile the product has just written. Timed apart, the reductions' few
percent are not lost in the product's run-to-run spread. ``(product + token_stats) /
(product + loss)`` is then the ratio the two streamed forwards reach when nothing else
differs: the price of the entropy's second sum (``benchmarks/speed.py`` times the whole
forwards: ``xla-stats`` against ``xla``)::

  python benchmarks/tile_reductions.py
  python benchmarks/tile_reductions.py --tiles-nv 1024x2048,2048x512 --dtype bf16

Times are medians of ``--repeats`` round-robin calls after a warm-up; they only mean
something on the machine that ran them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax import filtering, local_stats, tile_dot

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
LOGITS_DIMS = (((1,), (1,)), ((), ()))  # (n, D) x (v, D) -> (n, v)


def product_loop(vocab_block: int, upcast: bool):
  """A jitted ``(e_blk, c) -> (n,)``: every ``vocab_block``-row tile of ``c`` multiplied by
  ``e_blk`` (the forwards' tile product), kept alive by the least work, a row maximum."""

  def run(e_blk: jax.Array, c: jax.Array):  # (n, D), (V, D)
    def step(j, running_max):
      c_blk = lax.dynamic_slice_in_dim(c, j * vocab_block, vocab_block)  # (v, D)
      z = tile_dot.tile_dot(e_blk, c_blk, LOGITS_DIMS, upcast)  # (n, v) f32
      return jnp.maximum(running_max, jnp.max(z, axis=1))

    init = jnp.full((e_blk.shape[0],), -jnp.inf, jnp.float32)
    return lax.fori_loop(0, c.shape[0] // vocab_block, step, init)

  return jax.jit(run)


def reduction_loop(reduce_tile: Callable, init: Callable, num_tiles: int):
  """A jitted ``(z_tiles,) -> state``: ``num_tiles`` tiles folded into ``state`` by
  ``reduce_tile(state, z, first_class)``, without any product, taking the (n, v) f32 tiles of
  the (k, n, v) stack in turn. The stack is small (k = 2), so that each tile is read from the
  cache, as the forwards read a tile their product has just written."""

  def run(z_tiles: jax.Array):  # (k, n, v) f32
    stored, num_rows, num_columns = z_tiles.shape

    def step(j, state):
      return reduce_tile(state, z_tiles[j % stored], j * num_columns)

    return lax.fori_loop(0, num_tiles, step, init(num_rows))

  return jax.jit(run)


def loss_step(state, z, first_class):
  """The loss forward's per-tile work: ``filtering.online_lse_step``."""
  del first_class
  running_max, running_sum = state
  new_max, new_sum, _ = filtering.online_lse_step(running_max, running_sum, z, None)
  return new_max, new_sum


def stats_step(state, z, first_class):
  """``token_stats``' per-tile work: ``local_stats.online_stats_step``."""
  return local_stats.online_stats_step(state, z, first_class)


def _running(n: int, count: int):
  """``count`` running f32 (n,) values: the max at -inf, the rest at 0."""
  return (jnp.full((n,), -jnp.inf, jnp.float32),) + (jnp.zeros((n,), jnp.float32),) * (count - 1)


REDUCTIONS = {
  "loss": (loss_step, lambda n: _running(n, 2)),
  "token_stats": (stats_step, lambda n: (*_running(n, 3), jnp.zeros((n,), jnp.int32))),
}


def measure(token_block: int, vocab_block: int, args: argparse.Namespace) -> dict[str, float]:
  """Median ms per tile of the product loop and of each reduction loop at one tile shape."""
  dtype = DTYPES[args.dtype]
  key_e, key_c = jax.random.split(jax.random.key(args.seed))
  e_blk = jax.random.normal(key_e, (token_block, args.hidden), jnp.float32).astype(dtype)
  num_classes = args.tiles * vocab_block
  c = (jax.random.normal(key_c, (num_classes, args.hidden), jnp.float32) / 8).astype(dtype)
  upcast = tile_dot.upcasts_16bit(e_blk, c)
  z = tile_dot.tile_dot(e_blk, c, LOGITS_DIMS, upcast)  # (n, V) f32
  z_tiles = z.reshape(token_block, args.tiles, vocab_block).transpose(1, 0, 2)[:2]  # (2, n, v)
  calls = {"product": (product_loop(vocab_block, upcast), (e_blk, c))}
  for name, (reduce_tile, init) in REDUCTIONS.items():
    calls[name] = (reduction_loop(reduce_tile, init, args.tiles), (z_tiles,))
  for fn, fn_args in calls.values():
    jax.block_until_ready(fn(*fn_args))  # compile and warm up
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(args.repeats):
    for name, (fn, fn_args) in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*fn_args))
      times[name].append(1e3 * (time.perf_counter() - start) / args.tiles)
  return {name: statistics.median(values) for name, values in times.items()}


def parse_tiles(text: str) -> list[tuple[int, int]]:
  """``"2048x512,1024x2048"`` -> [(2048, 512), (1024, 2048)] (token_block x vocab_block).

  Raises:
    ValueError: an item is not two positive integers joined by ``x``.
  """
  tiles = []
  for item in text.split(","):
    parts = item.split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
      raise ValueError(f"{item!r} is not TOKENSxCLASSES with positive sizes, e.g. 2048x512")
    tiles.append((int(parts[0]), int(parts[1])))
  return tiles


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """The command line; a bad value exits with status 2 and one line naming its flag."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--tiles-nv",
    default="2048x512,1024x2048",
    help="token_block x vocab_block tile shapes, comma separated (default: token_stats' "
    "and the loss's CPU float32 forward tiles)",
  )
  parser.add_argument("--hidden", type=int, default=1024, help="D (default 1024)")
  parser.add_argument("--tiles", type=int, default=16, help="tiles per loop (default 16)")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
  parser.add_argument("--repeats", type=int, default=11)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  for name in ("hidden", "tiles", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
  try:
    args.tile_shapes = parse_tiles(args.tiles_nv)
  except ValueError as err:
    parser.error(f"--tiles-nv: {err}")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  print(
    f"{jax.devices()[0].device_kind}, {args.dtype}, D={args.hidden}, {args.tiles} tiles per "
    f"loop, median of {args.repeats}; ms per tile"
  )
  print(
    "tile (n x v) | product | loss reductions | token_stats reductions | "
    "(product + token_stats) / (product + loss)"
  )
  for token_block, vocab_block in args.tile_shapes:
    ms = measure(token_block, vocab_block, args)
    bound = (ms["product"] + ms["token_stats"]) / (ms["product"] + ms["loss"])
    print(
      f"{token_block}x{vocab_block} | {ms['product']:.2f} | {ms['loss']:.2f} | "
      f"{ms['token_stats']:.2f} | {bound:.3f}",
      flush=True,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
