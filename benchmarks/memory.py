"""Compiled temporary memory of ``cce_jax.linear_cross_entropy(impl="xla")`` vs the baselines.

Nothing is executed: every number is ``memory_analysis().temp_size_in_bytes`` of a program
compiled for abstract ``jax.ShapeDtypeStruct`` arguments, i.e. the scratch memory XLA reserves
beyond the inputs and outputs. At the paper's shape (N=8192 tokens, D=2304, V=256000 classes)
it compares the loss and the loss+grad (w.r.t. ``e`` and ``c``) of:

* ``baseline``: masked mean over ``labels != -100`` of
  ``optax.softmax_cross_entropy_with_integer_labels((e @ c.T).astype(float32), labels)``;
* ``jax-cce``: ``jax_cce.linear_cross_entropy(e, c, labels)`` (PyPI package, its defaults);
* ``xla``: ``cce_jax.linear_cross_entropy(e, c, labels, impl="xla")`` (default options);
* ``xla+weights``: the same with per-token ``weights=`` computed from the labels inside the
  step (``common.token_weights``): the weighted loss keeps the loss's memory bound.
* ``xla+stats``: ``cce_jax.token_stats(impl="xla")`` (lse, entropy, argmax, logprob, correct)
  in an RL-style objective (``common.stats_objective``: mean ``-logprob`` minus an entropy
  bonus): the statistics keep the loss's memory bound, forward and backward.
* ``xla-gif``: ``impl="xla"`` with ``grad_in_forward=True`` (three matrix passes, the
  gradient computed in the forward; ``cce_jax.grad_in_forward``).

bfloat16 rows are reported twice: as compiled, and compiled in a child process with
``--xla_disable_hlo_passes=while-loop-invariant-code-motion``. XLA:CPU has no bfloat16 matrix
product, so it converts the classifier to f32; loop-invariant code motion then hoists that
convert out of the loop and keeps a whole (V, D) f32 copy of ``c`` (2.4 GB here). GPUs and
TPUs multiply bfloat16 natively and do not make that copy, so the second row is the one that
predicts their memory.

Then the goals are checked (f32 ``xla``, ``xla+weights`` and ``xla+stats`` loss temp <= 0.5%
and loss+grad temp <= 1% of the baseline's), the sharded layouts are measured on 8 host devices
(``sharded_memory.py``: vocabulary-parallel needs <= 1/2 of the per-device bytes of a
replicated classifier), and
unless ``--quick`` a sweep over V and over N is drawn to a PNG chart.
1 MB = 1e6 bytes, 1 GB = 1e9 bytes.

  python benchmarks/memory.py                 # table, goals, sweep, benchmarks/memory.png
  python benchmarks/memory.py --quick         # table and goals only
  python benchmarks/memory.py --json out.json # also every number as JSON

The exit status is 1 when a goal fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from common import (
  LossFn,
  baseline_loss,
  cce_loss,
  jax_cce_loss,
  stats_objective,
  temp_bytes,
  token_weights,
  weighted_cce_loss,
)

PAPER_SHAPE = (8192, 2304, 256000)  # (N, D, V) of the CCE paper's Gemma 2 (2B) benchmark
SWEEP_VOCAB = (32768, 65536, 131072, 262144)  # at N=8192, D=2304
SWEEP_TOKENS = (1024, 4096, 16384, 65536)  # at V=256000, D=2304
# The sweep and the chart; the optional peer jax-cce (the bench extra) only where installed.
IMPLS = (
  ("baseline", "jax-cce", "xla") if importlib.util.find_spec("jax_cce") else ("baseline", "xla")
)
# The table at the paper's shape and the goals.
TABLE_IMPLS = (*IMPLS, "xla+weights", "xla+stats", "xla-gif")
MODES = ("loss", "loss+grad")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NO_LICM_FLAG = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
# Goals: xla temp / baseline temp at the paper's shape, f32.
GOALS = {"loss": 0.005, "loss+grad": 0.01}


EXPLANATION = """
'no LICM': compiled with XLA_FLAGS={flag}.
  XLA:CPU has no bf16 matmul: it converts c to f32, and loop-invariant code motion hoists
  that convert out of the loop as one (V, D) f32 copy; GPUs and TPUs do not make it.
  XLA:CPU has no bf16 scatter either: compiled for CPU, the bf16 'xla' backward holds dC as
  uint16 bits while it writes the blocks, and the bits -> bf16 step at the end is a copy:
  one (V, D) 16-bit buffer even without LICM, which GPUs and TPUs do not need.
jax-cce has no ignore_index (its mean is over all tokens); the others mask labels == -100.
"""


def xla_loss_explicit_eps(e: jax.Array, c: jax.Array, labels: jax.Array) -> jax.Array:
  """The "xla" loss with ``filter_eps`` spelled out as the value ``"auto"`` stands for."""
  eps = float(jnp.finfo(e.dtype).eps) / 32.0
  return cce_loss("xla", filter_eps=eps)(e, c, labels)


def weighted_loss_explicit_eps(e: jax.Array, c: jax.Array, labels: jax.Array) -> jax.Array:
  """``xla_loss_explicit_eps`` with ``weights=token_weights(labels)``."""
  eps = float(jnp.finfo(e.dtype).eps) / 32.0
  return cce_loss("xla", filter_eps=eps, weights=token_weights(labels))(e, c, labels)


LOSSES: dict[str, LossFn] = {
  "baseline": baseline_loss,
  "jax-cce": jax_cce_loss,
  "xla": cce_loss("xla"),
  "xla+weights": weighted_cce_loss("xla"),
  "xla+stats": stats_objective("xla"),
  "xla-gif": cce_loss("xla", grad_in_forward=True),
}
EXPLICIT_EPS: dict[str, LossFn] = {
  "xla-gif": lambda e, c, labels: cce_loss(
    "xla", filter_eps=float(jnp.finfo(e.dtype).eps) / 32.0, grad_in_forward=True
  )(e, c, labels),
  "xla": xla_loss_explicit_eps,
  "xla+weights": weighted_loss_explicit_eps,
}


def abstract_args(
  n: int, d: int, v: int, dtype: Any
) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """(e, c, labels) as shape/dtype structs: nothing is allocated."""
  return (
    jax.ShapeDtypeStruct((n, d), dtype),
    jax.ShapeDtypeStruct((v, d), dtype),
    jax.ShapeDtypeStruct((n,), jnp.int32),
  )


def with_mode(loss: LossFn, mode: str) -> Callable[..., Any]:
  """The loss itself, or its value and gradient w.r.t. ``e`` and ``c``."""
  return loss if mode == "loss" else jax.value_and_grad(loss, argnums=(0, 1))


def measure(impl: str, mode: str, args: Sequence[jax.ShapeDtypeStruct]) -> tuple[int, str]:
  """(temp bytes, note) of one implementation; the note is empty unless a workaround ran."""
  try:
    return temp_bytes(with_mode(LOSSES[impl], mode), *args), ""
  except ValueError as err:
    if impl not in EXPLICIT_EPS or "not inexact" not in str(err):
      raise
  # cce_jax resolves filter_eps="auto" with numpy.finfo, which rejects bfloat16; pass the
  # same value explicitly so the compiled program is the one the default would give.
  note = f"{impl}: filter_eps='auto' raised for bfloat16 (numpy.finfo), passed finfo.eps/32"
  return temp_bytes(with_mode(EXPLICIT_EPS[impl], mode), *args), note


def measure_table(dtype_name: str, shape: tuple[int, int, int]) -> dict[str, Any]:
  """Temp bytes of every (impl, mode) at ``shape``, with ratios to the baseline."""
  args = abstract_args(*shape, DTYPES[dtype_name])
  rows, notes = [], []
  for mode in MODES:
    base = None
    for impl in TABLE_IMPLS:
      nbytes, note = measure(impl, mode, args)
      base = nbytes if impl == "baseline" else base
      rows.append({"impl": impl, "mode": mode, "temp_bytes": nbytes, "ratio": nbytes / base})
      if note and note not in notes:
        notes.append(note)
  return {"dtype": dtype_name, "rows": rows, "notes": notes}


def measure_without_licm(dtype_name: str, shape: tuple[int, int, int]) -> dict[str, Any]:
  """``measure_table`` in a child process compiled without loop-invariant code motion."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {NO_LICM_FLAG}".strip()
  n, d, v = shape
  cmd = [sys.executable, os.path.abspath(__file__), "--_child-json", dtype_name, f"{n}x{d}x{v}"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"child {' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_sharded() -> dict[str, Any]:
  """benchmarks/sharded_memory.py in a child process (it needs 8 host devices): prints its
  table and returns its JSON."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_memory.py")
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "sharded.json")
    proc = subprocess.run(
      [sys.executable, script, "--json", out], capture_output=True, text=True, check=False
    )
    print(proc.stdout, end="")
    if not os.path.exists(out):
      raise RuntimeError(f"sharded_memory.py failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
      return json.load(f)


def human(nbytes: float) -> str:
  """Decimal MB below 1 GB, else GB."""
  if nbytes >= 1e9:
    return f"{nbytes / 1e9:.2f} GB"
  return f"{nbytes / 1e6:.1f} MB"


def print_table(tables: Sequence[dict[str, Any]]) -> None:
  header = f"{'dtype':<9} {'variant':<13} {'impl':<11} {'mode':<10} {'temp':>10} {'bytes':>14}"
  print(f"{header} {'vs baseline':>12}")
  print("-" * (len(header) + 13))
  for table in tables:
    for row in table["rows"]:
      print(
        f"{table['dtype']:<9} {table['variant']:<13} {row['impl']:<11} {row['mode']:<10} "
        f"{human(row['temp_bytes']):>10} {row['temp_bytes']:>14,} {row['ratio']:>11.3%}"
      )
    for note in table["notes"]:
      print(f"  note ({table['dtype']}, {table['variant']}): {note}")


def check_goals(f32_table: dict[str, Any]) -> list[dict[str, Any]]:
  """PASS/FAIL of the f32 ``xla``, ``xla+weights``, ``xla+stats`` and ``xla-gif`` temp ratios
  against ``GOALS``."""
  goals = []
  for impl in ("xla", "xla+weights", "xla+stats", "xla-gif"):
    for mode, limit in GOALS.items():
      row = next(r for r in f32_table["rows"] if r["impl"] == impl and r["mode"] == mode)
      goals.append(
        {
          "name": f"float32 {impl} {mode} temp <= {limit:.1%} of baseline",
          "ratio": row["ratio"],
          "limit": limit,
          "pass": row["ratio"] <= limit,
        }
      )
  return goals


def sweep() -> dict[str, Any]:
  """f32 loss+grad temp bytes of every implementation as V grows and as N grows."""
  n0, d, v0 = PAPER_SHAPE
  axes = {
    "vocab": (SWEEP_VOCAB, lambda v: (n0, d, v)),
    "tokens": (SWEEP_TOKENS, lambda n: (n, d, v0)),
  }
  out = {}
  for axis, (values, shape_of) in axes.items():
    series = {impl: [] for impl in IMPLS}
    for value in values:
      args = abstract_args(*shape_of(value), jnp.float32)
      for impl in IMPLS:
        series[impl].append(measure(impl, "loss+grad", args)[0])
      print(
        f"  {axis}={value:>6}: "
        + "  ".join(f"{impl} {human(series[impl][-1]):>9}" for impl in IMPLS),
        flush=True,
      )
    fixed = {"N": n0, "D": d} if axis == "vocab" else {"D": d, "V": v0}
    out[axis] = {"values": list(values), "fixed": fixed, "temp_bytes": series}
  return out


def draw_chart(result: dict[str, Any], path: str) -> None:
  """Two log-scale panels: temp bytes vs V and vs N."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  styles = {"baseline": ("tab:red", "o"), "jax-cce": ("tab:gray", "s"), "xla": ("tab:blue", "^")}
  labels = {"vocab": "vocabulary size V", "tokens": "tokens N"}
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, axis in zip(axes, ("vocab", "tokens"), strict=True):
    data = result[axis]
    for impl in IMPLS:
      color, marker = styles[impl]
      gb = [b / 1e9 for b in data["temp_bytes"][impl]]
      ax.plot(data["values"], gb, color=color, marker=marker, label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(data["values"], [f"{v:,}" for v in data["values"]])
    ax.set_xlabel(labels[axis])
    ax.set_ylabel("compiled temp memory (GB)")
    fixed = ", ".join(f"{k}={v}" for k, v in data["fixed"].items())
    ax.set_title(f"f32 loss+grad, {fixed}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.suptitle(f"Temporary memory (jax {jax.__version__}, {jax.default_backend()})")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description="Compiled temporary memory of cce_jax vs materialized logits and jax-cce "
    "(nothing is executed).",
  )
  parser.add_argument("--quick", action="store_true", help="skip the sweep and the chart")
  parser.add_argument("--json", metavar="PATH", help="write every number to PATH as JSON")
  parser.add_argument(
    "--chart",
    metavar="PATH",
    default=os.path.join(os.path.dirname(__file__), "memory.png"),
    help="where the sweep chart goes (default: %(default)s)",
  )
  # Internal: measure one dtype at NxDxV and print the table as JSON (the no-LICM child).
  parser.add_argument("--_child-json", nargs=2, metavar=("DTYPE", "SHAPE"), help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args._child_json:
    dtype_name, shape = args._child_json
    n, d, v = (int(x) for x in shape.split("x"))
    print(json.dumps(measure_table(dtype_name, (n, d, v))))
    return 0

  n, d, v = PAPER_SHAPE
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"compiled temp memory (nothing executed), N={n} D={d} V={v}")
  if "jax-cce" not in IMPLS:
    print("jax-cce is not installed (pip install -e '.[bench]'): its rows are left out")
  print()
  tables = []
  for dtype_name in DTYPES:
    table = measure_table(dtype_name, PAPER_SHAPE)
    tables.append({**table, "variant": "as compiled"})
  tables.append({**measure_without_licm("bfloat16", PAPER_SHAPE), "variant": "no LICM"})
  print_table(tables)
  print(EXPLANATION.format(flag=NO_LICM_FLAG))

  goals = check_goals(tables[0])
  for goal in goals:
    print(f"{'PASS' if goal['pass'] else 'FAIL'}: {goal['name']} (measured {goal['ratio']:.3%})")

  print()
  sharded = measure_sharded()
  goals.append(
    {
      "name": "sharded: vocab-parallel args+temps <= 1/2 of replicated, no N x V buffer",
      "ratio": sharded["ratio"],
      "pass": sharded["passed"],
    }
  )
  print(
    f"{'PASS' if sharded['passed'] else 'FAIL'}: {goals[-1]['name']} "
    f"(measured {sharded['ratio']:.3f})"
  )

  result: dict[str, Any] = {
    "jax_version": jax.__version__,
    "sharded": sharded,
    "backend": jax.default_backend(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "shape": {"N": n, "D": d, "V": v},
    "tables": tables,
    "goals": goals,
  }
  if not args.quick:
    print("\nsweep: float32 loss+grad temp memory")
    result["sweep"] = sweep()
    draw_chart(result["sweep"], args.chart)
    print(f"chart written to {args.chart}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"JSON written to {args.json}")
  return 0 if all(goal["pass"] for goal in goals) else 1


if __name__ == "__main__":
  sys.exit(main())
