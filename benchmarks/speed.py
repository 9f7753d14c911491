"""CPU speed benchmark of ``cce_jax.linear_cross_entropy(impl="xla")``.

Compares, in one run and on the same inputs, the loss and the loss+grad (w.r.t. ``e`` and
``c``) time of:

* ``baseline``: masked mean of ``optax.softmax_cross_entropy_with_integer_labels`` on the
  materialized f32 logits ``(e @ c.T).astype(float32)``;
* ``jax-cce``: ``jax_cce.linear_cross_entropy(e, c, labels)`` (PyPI package, its defaults);
* ``xla``: ``cce_jax.linear_cross_entropy(e, c, labels, impl="xla")`` (default options);
* ``xla-weights``: the same with per-token ``weights=`` computed from the labels inside the
  step (``common.token_weights``, about one in ten 0): the cost of weighting;
* ``xla-stats``: ``cce_jax.token_stats(impl="xla")`` (lse, entropy, argmax, logprob,
  correct) in an RL-style objective (``common.stats_objective``); its "loss" column is the
  statistics' forward, which should cost no more than the ``xla`` loss forward (the ratio
  ``loss xla-stats / xla`` is printed and checked per case);
* ``xla-gif``: the same with ``grad_in_forward=True`` (the gradient computed in the forward:
  three matrix passes instead of four);
* ``products``: a floor, not a loss (``common.products_floor``): the three (N, V)-sized f32
  matrix products of an exact loss+grad, run whole, with the least elementwise work between
  them. An exact loss+grad that skips no work lands near or above its ratio to the baseline
  (tiled products can run a little faster than whole ones); a goal well below it needs
  skipped work (filtering). The goal lines print it;
* with ``--extra``: ``xla-exact`` (``filter_eps=None``) and ``xla-nosort``
  (``sort_vocab=False``).

Each time is the median of ``--repeats`` calls after one warm-up call (compilation excluded);
the timed calls go round-robin over the implementations, and the goal lines also print the
ratio of each round's two adjacent calls.
Absolute times only mean something per machine; the ratios are what matter on CPU.

Full run (tens of minutes on a small CPU; needs an otherwise idle machine):
  python benchmarks/speed.py --extra --markdown --json benchmarks/speed.json
Smoke run:
  python benchmarks/speed.py --quick
Three matrix passes against four (issue 17's goals), with the floor:
  python benchmarks/speed.py --impls baseline,xla,xla-gif,products --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from typing import Any

import jax
from common import (
  DTYPES,
  IGNORE_INDEX,
  LossFn,
  Shape,
  baseline_loss,
  cce_loss,
  error_text,
  jax_cce_loss,
  parse_shapes,
  products_floor,
  stats_objective,
  timed,
  token_weights,
  weighted_cce_loss,
)

import cce_jax
from cce_jax import grad_in_forward, synthetic

DEFAULT_SHAPES = "4096x1024x32768:f32,4096x1024x32768:bf16"
QUICK_SHAPES = "1024x256x8192:f32,1024x256x8192:bf16"
DISTRIBUTIONS: dict[str, Callable[..., tuple[jax.Array, jax.Array, jax.Array]]] = {
  "uniform": synthetic.uniform_inputs,
  "trained": synthetic.trained_like_inputs,
}
# Goals on the loss+grad time: xla / baseline per distribution, and xla <= jax-cce everywhere.
BASELINE_GOALS = {"uniform": 1.1, "trained": 1.0}
# Goal on the forward time: token_stats (xla-stats) / the xla loss forward.
STATS_FORWARD_GOAL = 1.0
# Goals of xla-gif / baseline per (dtype, distribution) (issue 17).
GIF_GOALS = {("f32", "uniform"): 0.9, ("f32", "trained"): 0.9, ("bf16", "trained"): 0.8}

# name -> (loss function, cce_jax options for filter_stats, or None when not a cce_jax impl).
IMPLS: dict[str, tuple[LossFn, dict[str, Any] | None]] = {
  "baseline": (baseline_loss, None),
  "jax-cce": (jax_cce_loss, None),
  "xla": (cce_loss("xla"), {}),
  "xla-weights": (weighted_cce_loss("xla"), {"weighted": True}),
  "xla-stats": (stats_objective("xla"), None),
  "xla-gif": (cce_loss("xla", grad_in_forward=True), {"grad_in_forward": True}),
  "xla-exact": (cce_loss("xla", filter_eps=None), {"filter_eps": None}),
  "xla-nosort": (cce_loss("xla", sort_vocab=False), {"sort_vocab": False}),
  "products": (products_floor, None),
}
EXTRA_IMPLS = ("xla-exact", "xla-nosort")
# Impls whose value is not the loss: left out of the |loss - baseline| check.
NOT_LOSSES = ("xla-stats", "products")


def make_inputs(shape: Shape, distribution: str, seed: int):
  """``e``, ``c``, labels of ``shape`` drawn from ``distribution``, already on the device."""
  key = jax.random.fold_in(jax.random.key(seed), list(DISTRIBUTIONS).index(distribution))
  gen = DISTRIBUTIONS[distribution]
  return jax.block_until_ready(gen(key, shape.n, shape.d, shape.v, dtype=DTYPES[shape.dtype]))


def describe_inputs(e, c, labels, summary_tokens: int) -> dict[str, Any]:
  """``softmax_summary`` on the first ``summary_tokens`` tokens, at 2**-12 and at the auto eps."""
  k = min(summary_tokens, e.shape[0])
  auto_eps = cce_jax.default_filter_eps(e.dtype)
  summary = synthetic.softmax_summary(e[:k], c, labels[:k])
  summary["fraction_below_auto_eps"] = synthetic.softmax_summary(
    e[:k], c, labels[:k], eps=auto_eps
  )["fraction_below_eps"]
  summary.update(tokens=k, eps=2.0**-12, auto_eps=auto_eps)
  return summary


def skipped_fraction(e, c, labels, options: dict[str, Any]) -> float | str:
  """Fraction of backward tiles ``impl="xla"`` with ``options`` skips, or the error message.
  ``options["weighted"]`` stands for ``weights=token_weights(labels)``."""
  options = dict(options)
  if options.pop("weighted", False):
    options["weights"] = token_weights(labels)
  if options.pop("grad_in_forward", False):
    # The tiles grad_in_forward=True uses by default (a smaller token block).
    default = cce_jax.BlockSizes.get_default(e.dtype)
    options["block_sizes"] = grad_in_forward.default_block_sizes(default, c.shape[0])
  try:
    stats = cce_jax.filter_stats(e, c, labels, ignore_index=IGNORE_INDEX, **options)
    return float(stats["skipped_fraction"])
  except Exception as err:  # reported in the output and the JSON
    return error_text(err)


def _fmt_skip(value: float | str) -> str:
  return f"{value:.4f}" if isinstance(value, float) else f"error ({value})"


def time_impls(names: list[str], e, c, labels, repeats: int) -> dict[str, dict[str, Any]]:
  """Loss and loss+grad timings of every impl; ``{"error": ...}`` for one that raises.

  Each function is compiled and warmed up first; then the timed calls go round-robin over
  the implementations, so that drifts of the machine's speed hit every one of them alike.
  """
  fns, results = {}, {}
  for name in names:
    fn = IMPLS[name][0]
    loss_jit, grad_jit = jax.jit(fn), jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    try:
      loss_first, loss_value = timed(loss_jit, (e, c, labels))
      grad_first, (grad_value, _) = timed(grad_jit, (e, c, labels))
    except Exception as err:  # reported in the table and the JSON
      results[name] = {"error": error_text(err)}
      continue
    fns[name] = (loss_jit, grad_jit)
    results[name] = {
      "loss_times_ms": [],
      "loss_grad_times_ms": [],
      "loss_first_call_s": loss_first,
      "loss_grad_first_call_s": grad_first,
      "loss_value": float(loss_value),
      "loss_value_from_grad": float(grad_value),
    }
  for _ in range(repeats):
    for name, (loss_jit, grad_jit) in fns.items():
      results[name]["loss_times_ms"].append(1e3 * timed(loss_jit, (e, c, labels))[0])
      results[name]["loss_grad_times_ms"].append(1e3 * timed(grad_jit, (e, c, labels))[0])
  for name in fns:
    r = results[name]
    r["loss_ms"] = statistics.median(r["loss_times_ms"])
    r["loss_grad_ms"] = statistics.median(r["loss_grad_times_ms"])
    r["loss_min_ms"] = min(r["loss_times_ms"])
    r["loss_grad_min_ms"] = min(r["loss_grad_times_ms"])
  return results


def run_case(
  shape: Shape, distribution: str, impls: list[str], args: argparse.Namespace
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Benchmarks every impl of ``impls`` on one (shape, distribution); returns info and rows."""
  e, c, labels = make_inputs(shape, distribution, args.seed)
  print(f"\n== {shape.label} {shape.dtype} {distribution} ==", flush=True)
  summary = describe_inputs(e, c, labels, args.summary_tokens)
  print(
    f"  softmax summary (first {summary['tokens']} tokens): "
    f"mean entropy {summary['mean_entropy_nats']:.3f} nats, "
    f"median target prob {summary['median_target_prob']:.3f}, "
    f"below 2**-12 {summary['fraction_below_eps']:.4f}, "
    f"below auto filter_eps {summary['auto_eps']:.3g} {summary['fraction_below_auto_eps']:.4f}"
  )

  # Skipped fraction per cce_jax option set (sorted items), computed once per case.
  skips: dict[tuple, float | str] = {}

  def skip_for(options: dict[str, Any]) -> float | str:
    key = tuple(sorted(options.items()))
    if key not in skips:
      skips[key] = skipped_fraction(e, c, labels, options)
    return skips[key]

  skip_sorted = skip_for({})
  skip_unsorted = skip_for({"sort_vocab": False})
  print(
    f"  xla skipped backward tiles: {_fmt_skip(skip_sorted)} with vocab sort, "
    f"{_fmt_skip(skip_unsorted)} without (sort_vocab=False)"
  )
  info = {
    "shape": shape.label,
    "dtype": shape.dtype,
    "distribution": distribution,
    "softmax_summary": summary,
    "xla_skipped_fraction": skip_sorted,
    "xla_skipped_fraction_nosort": skip_unsorted,
  }

  rows = []
  timings = time_impls(impls, e, c, labels, args.repeats)
  for name in impls:
    options = IMPLS[name][1]
    row = {
      "shape": shape.label,
      "dtype": shape.dtype,
      "distribution": distribution,
      "impl": name,
      **timings[name],
    }
    skip = None if options is None else skip_for(options)
    row["skipped_fraction"] = skip if isinstance(skip, float) else None
    rows.append(row)
    if "error" in row:
      print(f"  {name:<11} ERROR {row['error']}", flush=True)
      continue
    print(
      f"  {name:<11} loss {row['loss_ms']:9.2f} ms   loss+grad {row['loss_grad_ms']:9.2f} ms"
      f"   (first calls {row['loss_first_call_s']:.2f} s / {row['loss_grad_first_call_s']:.2f} s)"
      f"   loss = {row['loss_value']:.6f}",
      flush=True,
    )

  ok = {row["impl"]: row for row in rows if "error" not in row}
  base, ref = ok.get("baseline"), ok.get("jax-cce")
  for row in rows:
    timed = "error" not in row
    row["ratio_vs_baseline"] = (
      row["loss_grad_ms"] / base["loss_grad_ms"] if base and timed else None
    )
    is_xla = row["impl"].startswith("xla")
    row["ratio_vs_jax_cce"] = (
      row["loss_grad_ms"] / ref["loss_grad_ms"] if ref and timed and is_xla else None
    )
  if "xla" in ok and "xla-weights" in ok:
    ratio = ok["xla-weights"]["loss_grad_ms"] / ok["xla"]["loss_grad_ms"]
    info["weights_loss_grad_ratio_vs_xla"] = ratio
    print(f"  loss+grad xla-weights / xla: {ratio:.3f}")
  if "xla" in ok and "xla-stats" in ok:
    ratio = ok["xla-stats"]["loss_ms"] / ok["xla"]["loss_ms"]
    info["stats_forward_ratio_vs_xla_loss"] = ratio
    print(f"  forward xla-stats (token_stats) / xla loss: {ratio:.3f}")
  if base:
    # xla-stats adds an entropy bonus and products is a floor: their values are not the loss.
    diffs = {
      name: abs(r["loss_value"] - base["loss_value"])
      for name, r in ok.items()
      if name not in NOT_LOSSES
    }
    info["loss_abs_diff_vs_baseline"] = diffs
    print(
      "  |loss - baseline loss|: " + ", ".join(f"{name} {diff:.2e}" for name, diff in diffs.items())
    )
  return info, rows


def _fmt(value: float | None, spec: str) -> str:
  return "-" if value is None else format(value, spec)


TABLE_HEADER = (
  "shape",
  "dtype",
  "distribution",
  "impl",
  "loss ms",
  "loss+grad ms",
  "l+g / baseline",
  "xla / jax-cce",
  "skipped",
)


def table_cells(row: dict[str, Any]) -> list[str]:
  """The printed cells of one result row."""
  return [
    row["shape"],
    row["dtype"],
    row["distribution"],
    row["impl"],
    _fmt(row.get("loss_ms"), ".2f") if "error" not in row else "error",
    _fmt(row.get("loss_grad_ms"), ".2f") if "error" not in row else "error",
    _fmt(row["ratio_vs_baseline"], ".3f"),
    _fmt(row["ratio_vs_jax_cce"], ".3f"),
    _fmt(row["skipped_fraction"], ".4f"),
  ]


def format_table(rows: list[dict[str, Any]], markdown: bool) -> str:
  """The result table, aligned plain text or Markdown."""
  cells = [table_cells(row) for row in rows]
  numeric = [False] * 4 + [True] * 5
  if markdown:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |"]
    lines.append("|" + "|".join("---:" if num else "---" for num in numeric) + "|")
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join(lines)
  widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(TABLE_HEADER)]

  def join(items: list[str] | tuple[str, ...]) -> str:
    return "  ".join(
      item.rjust(w) if num else item.ljust(w)
      for item, w, num in zip(items, widths, numeric, strict=True)
    )

  lines = [join(TABLE_HEADER), join(["-" * w for w in widths])]
  lines += [join(line) for line in cells]
  return "\n".join(lines)


def per_round_ratios(
  numerator: dict[str, Any], denominator: dict[str, Any], key: str
) -> list[float]:
  """The ratio of each round's two calls (``key``: ``"loss_times_ms"`` or
  ``"loss_grad_times_ms"``): adjacent in time, so a drift of the machine's speed between
  rounds cancels, which the ratio of the two medians does not guarantee."""
  return [a / b for a, b in zip(numerator[key], denominator[key], strict=True)]


def check_goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """PASS/FAIL of each goal on each (shape, dtype, distribution) that has the needed impls.

  A goal is judged on the ratio of the medians; the stats and ``xla-gif`` goals also carry
  ``rounds``, the per-round ratios (:func:`per_round_ratios`), printed beside the verdict."""
  cases: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
  for row in rows:
    cases.setdefault((row["shape"], row["dtype"], row["distribution"]), {})[row["impl"]] = row
  goals = []
  for (shape, dtype, dist), by_impl in cases.items():
    xla = by_impl.get("xla")
    if xla is None:
      continue
    where = f"{shape} {dtype} {dist}"
    if "baseline" in by_impl and dist in BASELINE_GOALS:
      limit = BASELINE_GOALS[dist]
      ratio = xla["ratio_vs_baseline"]
      goals.append(
        {
          "goal": f"loss+grad xla/baseline <= {limit} ({where})",
          "value": ratio,
          "passed": ratio is not None and ratio <= limit,
        }
      )
    if "xla-stats" in by_impl and "error" not in by_impl["xla-stats"] and "error" not in xla:
      ratio = by_impl["xla-stats"]["loss_ms"] / xla["loss_ms"]
      goals.append(
        {
          "goal": f"forward xla-stats/xla loss <= {STATS_FORWARD_GOAL} ({where})",
          "value": ratio,
          "passed": ratio <= STATS_FORWARD_GOAL,
          "rounds": per_round_ratios(by_impl["xla-stats"], xla, "loss_times_ms"),
        }
      )
    gif, gif_limit = by_impl.get("xla-gif"), GIF_GOALS.get((_dtype_key(dtype), dist))
    base = by_impl.get("baseline")
    if gif is not None and gif_limit is not None and base is not None:
      ratio = gif["ratio_vs_baseline"]
      products = by_impl.get("products")
      timed = "error" not in gif and "error" not in base
      goals.append(
        {
          "goal": f"loss+grad xla-gif/baseline <= {gif_limit} ({where})",
          "value": ratio,
          "passed": ratio is not None and ratio <= gif_limit,
          # The three products alone / baseline: where no tile is skipped, the floor.
          "floor": None if products is None else products.get("ratio_vs_baseline"),
          "rounds": per_round_ratios(gif, base, "loss_grad_times_ms") if timed else None,
        }
      )
    if "jax-cce" in by_impl:
      ratio = xla["ratio_vs_jax_cce"]
      goals.append(
        {
          "goal": f"loss+grad xla/jax-cce <= 1.0 ({where})",
          "value": ratio,
          "passed": ratio is not None and ratio <= 1.0,
        }
      )
  return goals


def _dtype_key(dtype: str) -> str:
  """ "f32"/"bf16"/"f16" for a row's dtype, however it is spelled."""
  names = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
  return names.get(str(dtype), str(dtype))


def environment() -> dict[str, Any]:
  """What the numbers were measured on."""
  device = jax.devices()[0]
  return {
    "jax_version": jax.__version__,
    "jaxlib_version": _package_version("jaxlib"),
    "jax_cce_version": _package_version("jax-cce"),
    "optax_version": _package_version("optax"),
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    "python": platform.python_version(),
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
  }


def _package_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--shapes",
    type=parse_shapes,
    default=None,
    help=f"comma-separated NxDxV:dtype list, dtype in {list(DTYPES)} (default: {DEFAULT_SHAPES})",
  )
  parser.add_argument(
    "--quick", action="store_true", help=f"smoke run on small shapes ({QUICK_SHAPES})"
  )
  parser.add_argument(
    "--distributions",
    default=",".join(DISTRIBUTIONS),
    help=f"comma-separated input distributions (default: {','.join(DISTRIBUTIONS)})",
  )
  parser.add_argument("--extra", action="store_true", help="also time xla-exact and xla-nosort")
  parser.add_argument(
    "--impls",
    default=None,
    help=f"comma-separated subset of {list(IMPLS)} to time instead of the default set "
    "(e.g. baseline,xla,xla-gif)",
  )
  parser.add_argument(
    "--repeats", type=int, default=5, help="timed calls per measurement (default: 5)"
  )
  parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the inputs")
  parser.add_argument(
    "--summary-tokens",
    type=int,
    default=512,
    help="tokens used by the softmax summary of the inputs (default: 512)",
  )
  parser.add_argument("--json", metavar="PATH", help="write every number to this JSON file")
  parser.add_argument(
    "--markdown", action="store_true", help="print the final table as a Markdown table"
  )
  args = parser.parse_args(argv)
  if args.quick and args.shapes is not None:
    parser.error("--quick and --shapes are exclusive")
  if args.shapes is None:
    args.shapes = parse_shapes(QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
  args.distributions = [d.strip() for d in args.distributions.split(",") if d.strip()]
  for dist in args.distributions:
    if dist not in DISTRIBUTIONS:
      parser.error(f"unknown distribution {dist!r}: use {list(DISTRIBUTIONS)}")
  if args.impls is not None:
    args.impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    unknown = [name for name in args.impls if name not in IMPLS]
    if unknown or not args.impls:
      parser.error(f"--impls: unknown or empty {unknown}; choose from {list(IMPLS)}")
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  if args.summary_tokens < 1:
    parser.error("--summary-tokens must be >= 1")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  env = environment()
  print(
    f"jax {env['jax_version']} (jaxlib {env['jaxlib_version']}), backend {env['backend']}, "
    f"device {env['device_kind']} x{env['device_count']}, "
    f"CPU count {env['cpu_count']} (usable {env['cpu_affinity']}), python {env['python']}"
  )
  print("Absolute times are only meaningful on this machine; the ratios are what matter.")
  impls = args.impls or ["baseline", "jax-cce", "xla", "xla-weights", "xla-stats", "xla-gif"] + (
    list(EXTRA_IMPLS) if args.extra else []
  )
  print(
    f"impls: {', '.join(impls)}; shapes: "
    f"{', '.join(f'{s.label}:{s.dtype}' for s in args.shapes)}; "
    f"distributions: {', '.join(args.distributions)}; median of {args.repeats} after 1 warm-up"
  )

  cases, rows = [], []
  for shape in args.shapes:
    for dist in args.distributions:
      info, case_rows = run_case(shape, dist, impls, args)
      cases.append(info)
      rows += case_rows

  goals = check_goals(rows)
  print()
  print(format_table(rows, args.markdown))
  print()
  for goal in goals:
    value = "not measured (an impl raised)" if goal["value"] is None else f"{goal['value']:.3f}"
    floor = goal.get("floor")
    floor = "" if floor is None else f" (floor, the three products alone: {floor:.3f})"
    rounds = goal.get("rounds")
    rounds = "" if not rounds else "; per round " + ", ".join(f"{r:.3f}" for r in rounds)
    print(f"{'PASS' if goal['passed'] else 'FAIL'}  {goal['goal']}: {value}{floor}{rounds}")
  if goals:
    passed = sum(goal["passed"] for goal in goals)
    print(f"{passed}/{len(goals)} goals passed")

  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {
          "environment": env,
          "argv": sys.argv[1:] if argv is None else argv,
          "repeats": args.repeats,
          "seed": args.seed,
          "cases": cases,
          "rows": rows,
          "goals": goals,
        },
        f,
        indent=2,
      )
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
