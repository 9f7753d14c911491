"""TPU benchmark of ``impl="pallas_tpu"`` against ``impl="xla"`` and the materialized baseline.

For each shape (default: the paper's N=8192, D=2304, V=256000 and Llama 3 8B's N=8192, D=4096,
V=128256, bfloat16, trained-like logits from ``cce_jax.synthetic``) and each implementation,
measures on the default device:

* time: median of ``--repeats`` calls of the loss and of the loss+grad (w.r.t. ``e`` and
  ``c``), after one warm-up call (compilation excluded), round-robin over implementations;
* memory: the compiled program's temporaries (``memory_analysis().temp_size_in_bytes``: what
  the loss needs beyond its inputs and outputs; for the Pallas kernels this includes the
  sorted copy of ``c`` of the vocabulary sort), and the device's peak bytes in use after the
  implementation ran (``memory_stats()``, cumulative over the process: a ceiling);
* for ``pallas_tpu``: the tiles the VMEM heuristic chose, the VMEM each kernel needs by its
  estimate, and the fraction of backward tiles the filter skips;
* a correctness check (``--check``, on by default): loss and gradients of ``pallas_tpu`` and
  ``xla`` without filtering (``filter_eps=None``) agree, at the first shape.

The one command that checks, times, sweeps and tunes on any accelerator is
``benchmarks/accelerator.py``; this script is the detailed view of this backend.

Prints a markdown table and writes everything to the JSON file given by ``--out``.

Implementations: ``baseline`` (masked mean of optax's cross-entropy on the materialized f32
logits), ``xla`` and ``pallas_tpu`` (``cce_jax.linear_cross_entropy`` defaults; ``pallas_tpu``
with the 16 MiB VMEM budget), ``pallas_tpu-32MiB`` (``vmem_budget_bytes`` 32 MiB: larger tiles
on v5p/v6e, whose default scoped VMEM is 32 MiB), ``pallas_tpu-exact`` (``filter_eps=None``).

Run on a TPU VM (needs ``pip install -e ".[bench]"``; about 10 minutes on one chip):
  python benchmarks/tpu.py --out benchmarks/out/tpu.json
Larger tiles on v6e / v5p:
  python benchmarks/tpu.py --impls baseline,xla,pallas_tpu,pallas_tpu-32MiB --out ...
The baseline may run out of memory on 16 GB chips (v5e) at the paper's shape: its logits and
their gradient take 2 x 8.4 GB; the table then says so. On a machine without a TPU the script
refuses to run, except ``--smoke`` (tiny shapes, Pallas in interpret mode) to check its plumbing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np
from common import IGNORE_INDEX, LossFn, baseline_loss, error_text, temp_bytes, timed

import cce_jax
from cce_jax import synthetic
from pallas_kernels.tpu import TPUBlockSizes, kernel_vmem_bytes, resolve

SHAPES = {"paper": (8192, 2304, 256000), "llama3_8b": (8192, 4096, 128256)}
SMOKE_SHAPES = {"smoke": (256, 256, 1024)}
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
MIB = 1024 * 1024
DEFAULT_IMPLS = "baseline,xla,pallas_tpu,pallas_tpu-exact"


def cce_loss(impl: str, interpret: bool, **options: Any) -> LossFn:
  """``common.cce_loss``, in interpret mode where ``interpret`` and ``impl`` is Pallas."""
  extra = {"interpret": interpret} if impl == "pallas_tpu" else {}
  return common.cce_loss(impl, **extra, **options)


def implementations(interpret: bool) -> dict[str, tuple[LossFn, dict[str, Any] | None]]:
  """name -> (loss function, pallas_tpu options or None)."""
  budget32 = {"block_sizes": TPUBlockSizes(vmem_budget_bytes=32 * MIB)}
  exact = {"filter_eps": None}
  return {
    "baseline": (baseline_loss, None),
    "xla": (cce_loss("xla", interpret), None),
    "pallas_tpu": (cce_loss("pallas_tpu", interpret), {}),
    "pallas_tpu-32MiB": (cce_loss("pallas_tpu", interpret, **budget32), budget32),
    "pallas_tpu-exact": (cce_loss("pallas_tpu", interpret, **exact), exact),
  }


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def pallas_details(e, c, labels, options: dict[str, Any], interpret: bool) -> dict[str, Any]:
  """Tiles, VMEM estimates and the skipped fraction of ``pallas_tpu`` with ``options``."""
  blocks = options.get("block_sizes", TPUBlockSizes())
  num_tokens, hidden = e.shape
  filter_eps = options.get("filter_eps", cce_jax.default_filter_eps(e.dtype))
  # c is read by groups of rows when the sort runs on a (V, D) c of whole groups.
  group = blocks.vocab_sort_group
  grouped = (
    filter_eps is not None
    and options.get("sort_vocab", True)
    and options.get("classifier_layout", "vd") == "vd"
    and group > 1
    and c.shape[0] % group == 0
  )
  tiles = resolve(blocks, num_tokens, hidden, c.shape[0], e.dtype, grouped)
  vmem = kernel_vmem_bytes(
    tiles.token_block, tiles.vocab_block, tiles.hidden_block, hidden, e.dtype.itemsize, grouped
  )
  forward = tiles.for_forward()  # the forward's own token and vocabulary blocks, hidden chunk
  vmem["forward"] = kernel_vmem_bytes(
    forward.token_block,
    forward.vocab_block,
    forward.hidden_block,
    hidden,
    e.dtype.itemsize,
    grouped,
  )["forward"]
  stats = cce_jax.filter_stats(
    e,
    c,
    labels,
    filter_eps=filter_eps,
    block_sizes=blocks,
    ignore_index=IGNORE_INDEX,
    impl="pallas_tpu",
    interpret=interpret,
  )
  return {
    "tiles": dict(tiles._asdict()),
    "vmem_estimate_bytes": vmem,
    "skipped_fraction": float(stats["skipped_fraction"]),
  }


def run_shape(
  name: str,
  shape: tuple[int, int, int],
  dtype: str,
  impl_names: list[str],
  args: argparse.Namespace,
) -> list[dict[str, Any]]:
  num_tokens, hidden, num_classes = shape
  key = jax.random.key(args.seed)
  e, c, labels = jax.block_until_ready(
    synthetic.trained_like_inputs(key, num_tokens, hidden, num_classes, DTYPES[dtype])
  )
  summary = synthetic.softmax_summary(e[:256], c, labels[:256])
  print(
    f"\n== {name} N={num_tokens} D={hidden} V={num_classes} {dtype} ==  softmax of 256 "
    f"tokens: entropy {summary['mean_entropy_nats']:.2f} nats, below 2**-12 "
    f"{summary['fraction_below_eps']:.4f}",
    flush=True,
  )
  impls = implementations(args.smoke)
  rows, compiled = [], {}
  for impl in impl_names:
    fn, pallas_options = impls[impl]
    row: dict[str, Any] = {
      "shape": name,
      "n": num_tokens,
      "d": hidden,
      "v": num_classes,
      "dtype": dtype,
      "impl": impl,
    }
    grad_fn = jax.value_and_grad(fn, argnums=(0, 1))
    try:
      if pallas_options is not None:
        row.update(pallas_details(e, c, labels, pallas_options, args.smoke))
      row["loss_temp_bytes"] = temp_bytes(fn, e, c, labels)
      row["loss_grad_temp_bytes"] = temp_bytes(grad_fn, e, c, labels)
      loss_jit, grad_jit = jax.jit(fn), jax.jit(grad_fn)
      row["loss_first_call_s"] = timed(loss_jit, (e, c, labels))[0]
      row["loss_grad_first_call_s"] = timed(grad_jit, (e, c, labels))[0]
      row["loss_value"] = float(loss_jit(e, c, labels))
      row["peak_bytes_in_use"] = _peak_bytes()
      compiled[impl] = (loss_jit, grad_jit)
      row["loss_times_ms"], row["loss_grad_times_ms"] = [], []
    except Exception as err:  # an OOM of the baseline, say: reported, not fatal
      row["error"] = error_text(err)
      print(f"  {impl:<17} ERROR {row['error']}", flush=True)
    rows.append(row)
  by_impl = {row["impl"]: row for row in rows}
  for _ in range(args.repeats):
    for impl, (loss_jit, grad_jit) in compiled.items():
      by_impl[impl]["loss_times_ms"].append(1e3 * timed(loss_jit, (e, c, labels))[0])
      by_impl[impl]["loss_grad_times_ms"].append(1e3 * timed(grad_jit, (e, c, labels))[0])
  for impl in compiled:
    row = by_impl[impl]
    row["loss_ms"] = statistics.median(row["loss_times_ms"])
    row["loss_grad_ms"] = statistics.median(row["loss_grad_times_ms"])
    print(
      f"  {impl:<17} loss {row['loss_ms']:9.2f} ms  loss+grad {row['loss_grad_ms']:9.2f} ms"
      f"  temp {row['loss_temp_bytes'] / MIB:9.1f} / {row['loss_grad_temp_bytes'] / MIB:9.1f}"
      f" MiB  loss {row['loss_value']:.6f}"
      + (f"  skipped {row['skipped_fraction']:.3f}" if "skipped_fraction" in row else ""),
      flush=True,
    )
  return rows


def check_against_xla(shape: tuple[int, int, int], dtype: str, smoke: bool) -> dict[str, float]:
  """Relative errors of pallas_tpu vs xla (both exact) in loss and gradients."""
  num_tokens, hidden, num_classes = shape
  e, c, labels = synthetic.trained_like_inputs(
    jax.random.key(1), num_tokens, hidden, num_classes, DTYPES[dtype]
  )
  results = {}
  for impl in ("pallas_tpu", "xla"):
    fn = cce_loss(impl, smoke, filter_eps=None)
    results[impl] = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(e, c, labels)
  (loss_p, (d_e_p, d_c_p)), (loss_x, (d_e_x, d_c_x)) = results["pallas_tpu"], results["xla"]

  def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

  errors = {"loss": rel(loss_p, loss_x), "d_e": rel(d_e_p, d_e_x), "d_c": rel(d_c_p, d_c_x)}
  print(
    f"\ncheck pallas_tpu vs xla (exact, {dtype}): "
    + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()),
    flush=True,
  )
  return errors


def _cell(row: dict[str, Any], key: str, scale: float, fmt: str) -> str:
  if "error" in row:
    return "error" if key.endswith("ms") or key.endswith("bytes") else ""
  value = row.get(key)
  return "" if value is None else format(value / scale, fmt)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  lines = [
    "| shape | dtype | impl | loss ms | loss+grad ms | loss+grad vs xla | loss temp MiB "
    "| loss+grad temp MiB | tiles (bn, bv, bd) | skipped |",
    "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
  ]
  xla = {(r["shape"], r["dtype"]): r for r in rows if r["impl"] == "xla" and "error" not in r}
  for r in rows:
    ref = xla.get((r["shape"], r["dtype"]))
    ratio = ""
    if ref is not None and "error" not in r:
      ratio = f"{r['loss_grad_ms'] / ref['loss_grad_ms']:.2f}"
    t = r.get("tiles")
    tiles = f"{t['token_block']}, {t['vocab_block']}, {t['hidden_block']}" if t else ""
    skipped = f"{r['skipped_fraction']:.3f}" if "skipped_fraction" in r else ""
    lines.append(
      f"| {r['shape']} | {r['dtype']} | {r['impl']} | {_cell(r, 'loss_ms', 1, '.2f')} "
      f"| {_cell(r, 'loss_grad_ms', 1, '.2f')} | {ratio} "
      f"| {_cell(r, 'loss_temp_bytes', MIB, '.1f')} "
      f"| {_cell(r, 'loss_grad_temp_bytes', MIB, '.1f')} | {tiles} | {skipped} |"
      + (f" {r['error']}" if "error" in r else "")
    )
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="path of the JSON results")
  parser.add_argument(
    "--shapes",
    default=",".join(SHAPES),
    help=f"comma-separated names ({', '.join(SHAPES)}) or NxDxV",
  )
  parser.add_argument("--dtypes", default="bf16", help="comma-separated: bf16, f32")
  parser.add_argument(
    "--impls",
    default=DEFAULT_IMPLS,
    help="comma-separated: baseline, xla, pallas_tpu, pallas_tpu-32MiB, pallas_tpu-exact",
  )
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--no-check",
    dest="check",
    action="store_false",
    help="skip the pallas_tpu vs xla correctness check",
  )
  parser.add_argument(
    "--smoke",
    action="store_true",
    help="tiny shape, Pallas in interpret mode: checks the script on any host",
  )
  return parser.parse_args(argv)


def _shape(text: str) -> tuple[str, tuple[int, int, int]]:
  if text in SHAPES:
    return text, SHAPES[text]
  n, d, v = (int(x) for x in text.lower().split("x"))
  return text, (n, d, v)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  backend = jax.default_backend()
  if backend != "tpu" and not args.smoke:
    print(
      f"benchmarks/tpu.py needs a TPU (the default backend is {backend!r}); "
      "use --smoke to check the script here.",
      file=sys.stderr,
    )
    return 2
  shapes = (
    list(SMOKE_SHAPES.items())
    if args.smoke
    else [_shape(s.strip()) for s in args.shapes.split(",") if s.strip()]
  )
  impl_names = [s.strip() for s in args.impls.split(",") if s.strip()]
  unknown = set(impl_names) - set(implementations(False))
  if unknown:
    raise SystemExit(f"unknown --impls {sorted(unknown)}")
  dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({backend}), jax {jax.__version__}", flush=True)
  rows = []
  for dtype in dtypes:
    for name, shape in shapes:
      rows.extend(run_shape(name, shape, dtype, impl_names, args))
  check = None
  if args.check:
    check = check_against_xla(shapes[0][1], dtypes[0], args.smoke)
  table = markdown(rows)
  print("\n" + table)
  result = {
    "device_kind": device.device_kind,
    "backend": backend,
    "jax_version": jax.__version__,
    "python": platform.python_version(),
    "smoke": args.smoke,
    "repeats": args.repeats,
    "rows": rows,
    "check_pallas_vs_xla": check,
    "markdown": table,
  }
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
