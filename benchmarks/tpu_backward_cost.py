"""The TPU compiler's numbers for ``impl="pallas_tpu"`` against the materialized baseline,
compiled ahead of time on a CPU host (no TPU needed).

For each TPU generation (``--topologies``, default v5e and v6e, one chip) and shape (default the
paper's N=8192, D=2304, V=256000, bfloat16), compiles the loss and the loss+grad (w.r.t. ``e``
and ``c``) of the masked mean of optax's cross-entropy on materialized f32 logits
(``baseline``) and of ``cce_jax.linear_cross_entropy(impl="pallas_tpu")`` with its defaults
(``pallas_tpu``: filtering and the vocabulary sort on; the compiler's estimate is static, so
nothing counts as skipped), and prints a markdown table of the compiled program's flops, HBM
bytes, estimated time (``optimal_seconds``) and temporaries. A Pallas kernel's flops and bytes are
the ``pl.CostEstimate`` its ``pallas_call`` declares (``pallas_kernels/tpu/kernels.py``).

With ``--parts`` it also compiles each Mosaic kernel of the loss+grad alone (with the exact
arguments the program gives it) and the rest of the program with the kernels replaced by
stand-ins of their outputs' shapes, and prints each part's estimate and their sum: XLA:TPU's
``optimal_seconds`` of a whole program with two Mosaic calls comes out negative, while each
part's does not (``docs/tpu_backend.md``).

Needs libtpu (``jax[tpu]``) for the TPU compiler; run with ``JAX_PLATFORMS=cpu`` (and
``ALLOW_MULTIPLE_LIBTPU_LOAD=1`` when another process on the host has libtpu loaded):
  JAX_PLATFORMS=cpu python benchmarks/tpu_backward_cost.py [--budget-mib 16,96:2048] [--sort both]
Each full-size compile takes a minute or more of CPU. ``docs/tpu_backend.md`` has the results.
"""

from __future__ import annotations

import argparse
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import optax

import cce_jax
from pallas_kernels.tpu import TPUBlockSizes, kernels

MIB = 1024 * 1024
IGNORE_INDEX = -100


def baseline(e, c, labels):
  """Masked mean of optax's cross-entropy on the materialized f32 logits."""
  logits = jnp.dot(e, c.T, preferred_element_type=jnp.float32)  # (N, V) f32
  counted = labels != IGNORE_INDEX  # (N,)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(counted, labels, 0))
  return jnp.sum(jnp.where(counted, losses, 0.0)) / jnp.maximum(jnp.sum(counted), 1)


def pallas(budget_mib: int, vocab_block: int | None, filtered: bool, sort_vocab: bool = True):
  def loss(e, c, labels):
    return cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      impl="pallas_tpu",
      filter_eps="auto" if filtered else None,
      sort_vocab=sort_vocab,
      block_sizes=TPUBlockSizes(vocab_block=vocab_block, vmem_budget_bytes=budget_mib * MIB),
    )

  return loss


def measure(fn, args, with_grad: bool) -> dict:
  f = jax.value_and_grad(fn, argnums=(0, 1)) if with_grad else fn
  with mock.patch("jax.default_backend", return_value="tpu"):
    compiled = jax.jit(f).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(
    flops=float(cost.get("flops", 0.0)),
    bytes=float(cost.get("bytes accessed", 0.0)),
    seconds=float(cost.get("optimal_seconds", float("nan"))),
    temp=compiled.memory_analysis().temp_size_in_bytes,
  )


KERNELS = ("forward_stats", "grads")


def _stand_in(name: str):
  """A cheap function with the outputs' shapes of ``kernels.<name>`` (kept live by depending
  on the inputs)."""

  def forward_stats(e, c, bias, geo, math, with_logit_sum, with_block_max, *args, **kwargs):
    lse = e[:, 0].astype(jnp.float32)  # (N,)
    blocks = geo.tiles.for_forward().num_vocab_blocks
    block_max = jnp.broadcast_to(lse[:, None], (geo.num_tokens, blocks))
    return lse, lse if with_logit_sum else None, block_max if with_block_max else None

  def grads(e, c, bias, token_stats, *args, **kwargs):
    d_bias = None if bias is None else bias.astype(jnp.float32)
    return e.astype(jnp.float32) * token_stats[:, :1], c, d_bias

  return {"forward_stats": forward_stats, "grads": grads}[name]


def measure_parts(fn, args) -> dict:
  """``measure`` of each Mosaic kernel of ``fn``'s loss+grad compiled alone (named by the
  kernel) and of the rest of the program (``rest``), and the sum of their ``seconds``."""
  calls, real = [], {name: getattr(kernels, name) for name in KERNELS}

  def recorder(name):
    def record(*call_args, **kwargs):
      calls.append((name, call_args, kwargs))
      return real[name](*call_args, **kwargs)

    return record

  grad_fn = jax.value_and_grad(fn, argnums=(0, 1))
  sharding = args[0].sharding
  recorders = {name: recorder(name) for name in KERNELS}
  jax.clear_caches()  # the loss's inner jits were traced with the real kernels
  with mock.patch.multiple(kernels, **recorders), mock.patch("jax.default_backend", lambda: "tpu"):
    jax.jit(grad_fn).trace(*args)
  # The custom VJP traces the primal forward (no residuals) before the forward of the VJP,
  # which is the one the compiled program keeps: the last call of each kernel.
  last = {name: (name, call_args, kwargs) for name, call_args, kwargs in calls}
  parts = {}
  for name, call_args, kwargs in last.values():
    leaves, treedef = jax.tree.flatten((call_args, kwargs))
    is_array = [isinstance(leaf, jax.Array) for leaf in leaves]
    arrays = [
      jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
      for leaf, array in zip(leaves, is_array, strict=True)
      if array
    ]

    def alone(*arrays, name=name, leaves=leaves, is_array=is_array, treedef=treedef):
      it = iter(arrays)
      full = [next(it) if array else leaf for leaf, array in zip(leaves, is_array, strict=True)]
      call_args, kwargs = jax.tree.unflatten(treedef, full)
      return real[name](*call_args, **kwargs)

    parts[name] = measure(alone, arrays, False)
  stand_ins = {name: _stand_in(name) for name in KERNELS}
  jax.clear_caches()
  with mock.patch.multiple(kernels, **stand_ins):
    parts["rest"] = measure(fn, args, True)
  jax.clear_caches()
  parts["sum"] = sum(part["seconds"] for part in parts.values())
  return parts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topologies", default="v5e:2x2,v6e:2x2")
  parser.add_argument("--shape", default="8192,2304,256000", help="N,D,V")
  parser.add_argument(
    "--budget-mib",
    default="16",
    help="VMEM budgets of pallas_tpu in MiB, each optionally :VOCAB_BLOCK (e.g. 16,96:2048)",
  )
  parser.add_argument("--exact", action="store_true", help="also pallas_tpu with filter_eps=None")
  parser.add_argument(
    "--sort",
    choices=("on", "off", "both"),
    default="on",
    help="pallas_tpu's sort_vocab (off: no sorted copy of c)",
  )
  parser.add_argument("--no-baseline", action="store_true")
  parser.add_argument(
    "--parts",
    action="store_true",
    help="also each pallas_tpu kernel of loss+grad compiled alone, the rest, and their sum",
  )
  args = parser.parse_args(argv)
  from jax.experimental import topologies

  n, d, v = (int(x) for x in args.shape.split(","))
  print("| chip | impl | loss: est. / temp | loss+grad: est. / temp | loss+grad TFLOP / HBM GB |")
  print("|---|---|---:|---:|---:|")
  for topology in args.topologies.split(","):
    device = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    shapes = [
      jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=sharding),
      jax.ShapeDtypeStruct((v, d), jnp.bfloat16, sharding=sharding),
      jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
    ]
    impls = {} if args.no_baseline else {"baseline": baseline}
    for spec in args.budget_mib.split(","):
      budget, _, vocab_block = spec.partition(":")
      vocab_block = int(vocab_block) if vocab_block else None
      name = f"pallas_tpu {budget} MiB" + (f" bv={vocab_block}" if vocab_block else "")
      if args.sort in ("on", "both"):
        impls[name] = pallas(int(budget), vocab_block, True)
      if args.sort in ("off", "both"):
        impls[f"{name} unsorted"] = pallas(int(budget), vocab_block, True, sort_vocab=False)
      if args.exact:
        impls[f"{name} exact"] = pallas(int(budget), vocab_block, False)
    for name, fn in impls.items():
      loss = measure(fn, shapes, False)
      grad = measure(fn, shapes, True)
      print(
        f"| {topology.split(':')[0]} | {name} | {loss['seconds'] * 1e3:.1f} ms / "
        f"{loss['temp'] / MIB:.1f} MiB | {grad['seconds'] * 1e3:.1f} ms / "
        f"{grad['temp'] / MIB:.0f} MiB | {grad['flops'] / 1e12:.1f} / {grad['bytes'] / 1e9:.1f} |",
        flush=True,
      )
      if args.parts and name != "baseline":
        parts = measure_parts(fn, shapes)
        total = parts.pop("sum")
        cells = ", ".join(
          f"{part}: {p['seconds'] * 1e3:.1f} ms, {p['flops'] / 1e12:.1f} T, "
          f"{p['bytes'] / 1e9:.1f} GB"
          for part, p in parts.items()
        )
        row = f"|   | {name}, loss+grad by parts | {cells} | sum {total * 1e3:.1f} ms | |"
        print(row, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
