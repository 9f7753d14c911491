"""Per-device memory of the sharded loss+grad on an 8-device CPU mesh (compiled, not run).

Compares, at (N=65536, D=2304, V=256000) bfloat16, ``cce_jax.linear_cross_entropy`` with

* ``replicated``: mesh (data=8), tokens split 8 ways, the classifier on every device;
* ``vocab-parallel``: mesh (data=2, tensor=4), tokens split 2 ways, the classifier split 4 ways
  along the vocabulary (``vocab_axis="tensor"``),

reading ``memory_analysis()`` of the SPMD program (its numbers are per device): argument bytes
(this device's share of e, c and labels) plus temporary bytes. The goal: vocab-parallel needs at
most half the replicated layout's bytes, and no buffer of either is as large as N x V.

Run it directly (it forces 8 host devices itself) or through ``benchmarks/memory.py``:

  python benchmarks/sharded_memory.py [--json out.json] [--tokens N]

The exit status is 1 when the goal fails.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before jax starts: 8 CPU devices, no LICM (see memory.py)
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_disable_hlo_passes=while-loop-invariant-code-motion"
  ).strip()

import argparse
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import cce_jax

SHAPE = (65536, 2304, 256000)  # (N, D, V)
LAYOUTS = {
  # name: (mesh shape, mesh axes, token_axes, vocab_axis)
  "replicated": ((8,), ("data",), ("data",), None),
  "vocab-parallel": ((2, 4), ("data", "tensor"), ("data",), "tensor"),
}
GOAL = 0.5  # vocab-parallel bytes / replicated bytes


def measure(layout: str, shape: tuple[int, int, int] = SHAPE) -> dict[str, Any]:
  """Per-device argument, temporary and output bytes of loss+grad (w.r.t. e and c)."""
  num_tokens, hidden, num_classes = shape
  mesh_shape, axes, token_axes, vocab_axis = LAYOUTS[layout]
  mesh = jax.make_mesh(mesh_shape, axes, axis_types=(AxisType.Explicit,) * len(axes))
  placed = lambda shape, dtype, spec: jax.ShapeDtypeStruct(
    shape, dtype, sharding=NamedSharding(mesh, spec)
  )
  e = placed((num_tokens, hidden), jnp.bfloat16, P(token_axes))
  c = placed((num_classes, hidden), jnp.bfloat16, P(vocab_axis))
  labels = placed((num_tokens,), jnp.int32, P(token_axes))

  def loss(e, c, labels):
    return cce_jax.linear_cross_entropy(
      e, c, labels, mesh=mesh, token_axes=token_axes, vocab_axis=vocab_axis
    )

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(e, c, labels).compile()
  stats = compiled.memory_analysis()
  hlo = compiled.as_text()
  logits_elems = num_tokens * num_classes
  largest = max(_buffer_elements(hlo), default=0)
  return {
    "layout": layout,
    "mesh": dict(zip(axes, mesh_shape, strict=True)),
    "argument_bytes": int(stats.argument_size_in_bytes),
    "temp_bytes": int(stats.temp_size_in_bytes),
    "output_bytes": int(stats.output_size_in_bytes),
    "largest_buffer_elements": largest,
    "holds_n_by_v": largest >= logits_elems // 8,  # any N x V buffer, even split 8 ways
  }


def _buffer_elements(hlo: str) -> list[int]:
  """Element counts of every array shape in the per-device HLO text."""
  import re

  sizes = []
  for dims in re.findall(r"(?:f32|bf16|s32|f16|pred)\[([0-9,]+)\]", hlo):
    count = 1
    for d in dims.split(","):
      count *= int(d)
    sizes.append(count)
  return sizes


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", help="write the numbers as JSON to this path")
  parser.add_argument("--tokens", type=int, default=SHAPE[0], help="N (default %(default)s)")
  args = parser.parse_args(argv)
  shape = (args.tokens, *SHAPE[1:])
  rows = [measure(layout, shape) for layout in LAYOUTS]
  total = lambda r: r["argument_bytes"] + r["temp_bytes"]
  ratio = total(rows[1]) / total(rows[0])
  print(
    f"Sharded loss+grad, per device, N={shape[0]} D={shape[1]} V={shape[2]} bf16, 8 CPU "
    "devices (no LICM)"
  )
  print("| layout | mesh | arguments | temporaries | args + temps | outputs | N x V buffer |")
  print("|---|---|---:|---:|---:|---:|---|")
  for r in rows:
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    print(
      f"| {r['layout']} | {mesh} | {r['argument_bytes'] / 1e9:.2f} GB | "
      f"{r['temp_bytes'] / 1e9:.2f} GB | {total(r) / 1e9:.2f} GB | "
      f"{r['output_bytes'] / 1e9:.2f} GB | {'yes' if r['holds_n_by_v'] else 'no'} |"
    )
  passed = ratio <= GOAL and not any(r["holds_n_by_v"] for r in rows)
  print(
    f"vocab-parallel / replicated = {ratio:.3f} (goal <= {GOAL}; no N x V buffer): "
    f"{'PASS' if passed else 'FAIL'}"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"shape": shape, "rows": rows, "ratio": ratio, "passed": passed}, f, indent=1)
  return 0 if passed else 1


if __name__ == "__main__":
  raise SystemExit(main())
