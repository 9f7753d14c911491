"""The tiling model behind ``BlockSizes.get_default`` on GPUs and TPUs (``docs/tiling_model.md``).

The chunked ``impl="xla"`` walks the (token, vocabulary) plane one tile per while-loop
iteration. Per pass, the model says

    time = tiles x overhead + FLOPs not skipped / peak

with ``overhead`` the fixed cost of one loop iteration on the backend and ``peak`` its dense
matrix-product throughput (``DEVICES``: assumed numbers, sources in the doc). The forward
skips nothing: ``2 N V D`` FLOPs. The backward recomputes the logits and forms both gradient
products, ``6 N V D`` FLOPs, of which the fraction ``skipped`` of tiles that gradient filtering
clears is skipped. ``skipped`` is *measured*, here on the CPU, with ``cce_jax.filter_stats`` on
trained-like inputs (``cce_jax.synthetic.trained_like_inputs``) for each candidate tile.

Measuring at the full N=8192 costs minutes of CPU per tile, so the fraction is measured on
``--tokens`` tokens drawn the same way (tokens are i.i.d. in the synthetic inputs, so the
fraction of skipped tiles does not depend on N once N holds a few token blocks); D and V are
the full shape's. The pick for a backend is the candidate with the smallest worst-case regret
(modelled time over the best candidate's) over its devices and both shapes, among tiles whose
f32 logits fit ``TILE_BYTES_LIMIT``.

  python benchmarks/tiling_model.py --json benchmarks/tiling_model.json   # ~15 min on 2 CPUs
  python benchmarks/tiling_model.py --from-json benchmarks/tiling_model.json  # the table again
  python benchmarks/tiling_model.py --smoke                                # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys

import jax
import jax.numpy as jnp

import cce_jax
from cce_jax import synthetic

SHAPES = {"paper": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}
SMOKE_SHAPES = {"smoke": (256, 64, 5000)}
# Candidate (token_block, vocab_block) tiles; the first is today's (CPU) bf16 default.
CANDIDATES = (
  (256, 512),
  (256, 2048),
  (512, 1024),
  (512, 2048),
  (512, 4096),
  (1024, 1024),
  (1024, 2048),
  (1024, 4096),
  (1024, 8192),
  (2048, 2048),
)
SMOKE_CANDIDATES = ((64, 128), (128, 512), (256, 1024))
# One f32 logits tile at most this large: the chunked loop keeps a handful of them alive.
TILE_BYTES_LIMIT = 32 * 1024 * 1024
# At most this many tiles at the paper's shape (1/16 of the 16,000 of the CPU's bf16 tiles):
# the per-iteration overheads are the least certain numbers of the model, so the pick does
# not rely on them being small.
MAX_PAPER_TILES = 1000


@dataclasses.dataclass(frozen=True)
class Device:
  """One accelerator as the model sees it (assumed numbers; sources in docs/tiling_model.md).

  Attributes:
    backend: the JAX backend name (``jax.default_backend()``).
    overhead_s: fixed seconds per while-loop iteration of the chunked loop.
    peak_flops: dense matrix-product FLOP/s by input dtype name.
  """

  backend: str
  overhead_s: float
  peak_flops: dict[str, float]


DEVICES = {
  "H100 SXM": Device("gpu", 40e-6, {"bfloat16": 989e12, "float32": 495e12}),
  "A100 SXM": Device("gpu", 40e-6, {"bfloat16": 312e12, "float32": 156e12}),
  "TPU v5e": Device("tpu", 5e-6, {"bfloat16": 197e12, "float32": 197e12 / 3}),
  "TPU v5p": Device("tpu", 5e-6, {"bfloat16": 459e12, "float32": 459e12 / 3}),
}


def num_tiles(n: int, v: int, tile: tuple[int, int]) -> int:
  """Tiles of ``tile = (token_block, vocab_block)`` over N x V (blocks clamped to the problem)."""
  return math.ceil(n / min(tile[0], n)) * math.ceil(v / min(tile[1], v))


def modelled_seconds(
  shape: tuple[int, int, int], tile: tuple[int, int], skipped: float, device: Device, dtype: str
) -> float:
  """Modelled seconds of one forward plus one backward pass at ``shape = (N, D, V)``."""
  n, d, v = shape
  tiles = num_tiles(n, v, tile)
  flops = 2 * n * v * d
  peak = device.peak_flops[dtype]
  forward = tiles * device.overhead_s + flops / peak
  backward = tiles * device.overhead_s + (1.0 - skipped) * 3 * flops / peak
  return forward + backward


def measure_skipped(
  shape: tuple[int, int, int], tokens: int, dtype: str, candidates, seed: int = 0
) -> dict[tuple[int, int], float]:
  """Fraction of backward tiles ``filter_stats`` skips for each candidate tile, on
  ``min(tokens, N)`` trained-like tokens at hidden size D and V classes of ``shape``."""
  n, d, v = shape
  e, c, labels = synthetic.trained_like_inputs(
    jax.random.key(seed), min(tokens, n), d, v, jnp.dtype(dtype)
  )
  fractions = {}
  for tile in candidates:
    sizes = cce_jax.BlockSizes(token_block=tile[0], vocab_block=tile[1])
    stats = cce_jax.filter_stats(e, c, labels, impl="xla", block_sizes=sizes)
    fractions[tile] = float(stats["skipped_fraction"])
    print(f"  {dtype} {shape} tile {tile}: skipped {fractions[tile]:.3f}", file=sys.stderr)
  return fractions


def pick(
  backend: str, shapes: dict[str, tuple[int, int, int]], skipped: dict, dtype: str
) -> tuple[int, int]:
  """The candidate with the smallest worst-case regret over ``backend``'s devices and
  ``shapes`` among those within ``TILE_BYTES_LIMIT`` and ``MAX_PAPER_TILES``;
  ``skipped[shape_name][tile]`` is the measured skipped fraction."""
  paper = shapes.get("paper")  # absent in --smoke
  allowed = [
    tile
    for tile in skipped[next(iter(shapes))]
    if tile[0] * tile[1] * 4 <= TILE_BYTES_LIMIT
    and (paper is None or num_tiles(paper[0], paper[2], tile) <= MAX_PAPER_TILES)
  ]
  regret = {tile: 0.0 for tile in allowed}
  for device in (dev for dev in DEVICES.values() if dev.backend == backend):
    for name, shape in shapes.items():
      times = {
        tile: modelled_seconds(shape, tile, skipped[name][tile], device, dtype) for tile in allowed
      }
      best = min(times.values())
      for tile in allowed:
        regret[tile] = max(regret[tile], times[tile] / best)
  return min(allowed, key=lambda tile: (regret[tile], -tile[0] * tile[1]))


def markdown(shapes: dict, skipped: dict, dtype: str, tokens: int) -> str:
  """The table: per shape and tile, tiles, measured skipped fraction, modelled ms per device."""
  names = list(DEVICES)
  lines = [
    f"{dtype}, skipped fraction measured on {tokens} trained-like tokens; modelled forward +"
    " backward ms per device.",
    "",
    "| shape | tile | tiles | skipped | " + " | ".join(names) + " |",
    "|---|---|---:|---:|" + "---:|" * len(names),
  ]
  for name, shape in shapes.items():
    for tile, fraction in skipped[name].items():
      times = [modelled_seconds(shape, tile, fraction, DEVICES[dev], dtype) * 1e3 for dev in names]
      lines.append(
        f"| {name} | {tile[0]} x {tile[1]} | {num_tiles(shape[0], shape[2], tile)} | "
        f"{fraction:.3f} | " + " | ".join(f"{t:.1f}" for t in times) + " |"
      )
  for backend in ("gpu", "tpu"):
    tile = pick(backend, shapes, skipped, dtype)
    regret = max(
      modelled_seconds(shape, tile, skipped[name][tile], device, dtype)
      / min(
        modelled_seconds(shape, other, skipped[name][other], device, dtype)
        for other in skipped[name]
      )
      for device in DEVICES.values()
      if device.backend == backend
      for name, shape in shapes.items()
    )
    lines.append(
      f"\nPick for {backend}: {tile[0]} x {tile[1]}, modelled at most {regret:.2f}x the best"
      " candidate (any tile count) on its devices and shapes."
    )
  return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=2048, help="tokens measured per shape")
  parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated dtypes")
  parser.add_argument("--json", help="write the measured fractions and picks here")
  parser.add_argument("--from-json", help="print the table of an earlier --json, measure nothing")
  parser.add_argument("--tiles", help="candidate tiles, e.g. 256x512,1024x2048 (default: all)")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes and tiles, seconds")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  candidates = SMOKE_CANDIDATES if args.smoke else CANDIDATES
  if args.tiles:
    candidates = tuple(tuple(int(x) for x in tile.split("x")) for tile in args.tiles.split(","))
  if args.from_json:
    try:
      with open(args.from_json) as f:
        record = json.load(f)
    except OSError as err:
      print(f"--from-json: cannot read {args.from_json!r} ({err.strerror})", file=sys.stderr)
      return 2
    shapes = {name: tuple(shape) for name, shape in record["shapes"].items()}
    measured = {
      dtype: {
        name: {tuple(map(int, k.split("x"))): val for k, val in per_tile.items()}
        for name, per_tile in per_shape.items()
      }
      for dtype, per_shape in record["skipped"].items()
    }
    tokens = record["tokens"]
  else:
    tokens = args.tokens
    measured = {
      dtype: {
        name: measure_skipped(shape, tokens, dtype, candidates) for name, shape in shapes.items()
      }
      for dtype in args.dtypes.split(",")
    }
  for dtype, skipped in measured.items():
    print(markdown(shapes, skipped, dtype, tokens), end="\n\n")
  if args.json:
    record = {
      "date": datetime.date.today().isoformat(),
      "jax": jax.__version__,
      "machine": platform.processor() or platform.machine(),
      "tokens": tokens,
      "shapes": shapes,
      "skipped": {
        dtype: {
          name: {f"{t[0]}x{t[1]}": val for t, val in per_tile.items()}
          for name, per_tile in per_shape.items()
        }
        for dtype, per_shape in measured.items()
      },
      "picks": {
        dtype: {backend: pick(backend, shapes, skipped, dtype) for backend in ("gpu", "tpu")}
        for dtype, skipped in measured.items()
      },
    }
    with open(args.json, "w") as f:
      json.dump(record, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
