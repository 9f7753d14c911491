"""What the TPU compiler says about the loss on TPU v4, v5e, v5p and v6e, compiled on this CPU host.

Compiles, for each point of the grid, the loss (``loss``) or the loss and its gradient with
respect to ``e`` and ``c`` (``loss+grad``) with the real XLA:TPU compiler (Mosaic included) for
a TPU topology described by libtpu (``cce_jax.aot.tpu``; nothing runs), and prints per device:
the temporary memory, the flops and HBM bytes of the compiler's cost analysis, and its own time
estimate (``optimal_seconds``). These are compiler estimates, not measurements.

Implementations: ``baseline`` (optax on the materialized float32 logits), ``xla`` and
``pallas_tpu``. Layouts: ``single`` (one chip: ``v5e:1x1``, ``v5p:1x1x1``, ...) and
``vocab-parallel`` (a 4-chip slice, ``v5e:2x2``/``v5p:2x2x1``, the classifier split 4 ways
along the vocabulary, every chip holding all tokens).

    pip install -e ".[tpu-aot,bench]"
    JAX_PLATFORMS=cpu python benchmarks/tpu_aot.py                  # the default grid
    JAX_PLATFORMS=cpu python benchmarks/tpu_aot.py --generations v5e --dtypes bf16,f32 \\
        --softcap off,on --shapes paper,llama3 --layouts single,vocab-parallel
    JAX_PLATFORMS=cpu python benchmarks/tpu_aot.py --json benchmarks/tpu_aot.json \\
        --results benchmarks/RESULTS.md   # rewrite the RESULTS.md section between its markers

The default grid is every generation, implementation and mode at the paper's shape in bfloat16
without softcap, on one chip (24 compiles, a few minutes of CPU); ``--full`` takes every value
of every axis. A point that fails to compile is a row with its error, not a crash.

XLA:TPU's cost analysis counts a while loop's body once and gives no time estimate for a
program with loops: ``impl="xla"``'s loops (and the backward of ``pallas_tpu`` with a
softcap or a bias) show flops and bytes of one iteration, marked so in the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX starts: no attached TPU is looked for

import jax
import jax.numpy as jnp
from common import DTYPES, IGNORE_INDEX, baseline_loss, error_text
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from cce_jax.aot import tpu

GENERATIONS = ("v4", "v5e", "v5p", "v6e")
IMPLS = ("baseline", "xla", "pallas_tpu")
MODES = ("loss", "loss+grad")
SHAPES = {  # name: (N, D, V)
  "paper": (8192, 2304, 256000),  # Gemma 2 (2B)'s head, 8192 tokens (the CCE paper's benchmark)
  "llama3": (8192, 4096, 128256),  # Llama 3 (8B)'s head
}
SOFTCAPS = {"off": None, "on": 30.0}
LAYOUTS = {  # name: (chips, vocabulary axis size)
  "single": (1, 1),
  "vocab-parallel": (4, 4),
}
DEFAULTS = {
  "generations": GENERATIONS,
  "impls": IMPLS,
  "modes": MODES,
  "dtypes": ("bf16",),
  "softcap": ("off",),
  "shapes": ("paper",),
  "layouts": ("single",),
}
CHOICES = {
  "generations": GENERATIONS,
  "impls": IMPLS,
  "modes": MODES,
  "dtypes": ("bf16", "f32"),
  "softcap": tuple(SOFTCAPS),
  "shapes": tuple(SHAPES),
  "layouts": tuple(LAYOUTS),
}
BEGIN = "<!-- tpu_aot: begin (benchmarks/tpu_aot.py --results rewrites this section) -->"
END = "<!-- tpu_aot: end -->"
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Point:
  """One compile of the grid."""

  generation: str
  impl: str
  mode: str
  dtype: str
  softcap: str
  shape: str
  layout: str

  @property
  def topology(self) -> str:
    chips, _ = LAYOUTS[self.layout]
    return tpu.default_topology(self.generation, chips)


def loss_fn(impl: str, softcap: float | None, mesh: jax.sharding.Mesh, vocab_axis: str | None):
  """(e (N, D), c (V, D), labels (N,)) -> the scalar loss of ``impl``."""
  if impl == "baseline":
    if softcap is None:
      return baseline_loss

    def capped(e, c, labels):
      logits = softcap * jnp.tanh((e @ c.T).astype(jnp.float32) / softcap)
      valid = labels != IGNORE_INDEX
      safe = jnp.where(valid, labels, 0)
      per_token = (
        jax.nn.logsumexp(logits, axis=-1)
        - jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
      )
      return jnp.sum(jnp.where(valid, per_token, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

    return capped
  import cce_jax

  def loss(e, c, labels):
    return cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      impl=impl,
      softcap=softcap,
      ignore_index=IGNORE_INDEX,
      mesh=mesh if vocab_axis else None,
      vocab_axis=vocab_axis,
    )

  return loss


def compile_point(point: Point) -> dict[str, Any]:
  """The compiler's numbers of one point (per device), or its error."""
  row: dict[str, Any] = {**dataclasses.asdict(point), "topology": point.topology}
  tokens, hidden, classes = SHAPES[point.shape]
  dtype = DTYPES[point.dtype]
  chips, vocab_split = LAYOUTS[point.layout]
  vocab_axis = "vocab" if vocab_split > 1 else None
  start = time.perf_counter()
  try:
    mesh = tpu.make_mesh(point.topology, (chips,), ("vocab",), axis_types=(AxisType.Auto,))
    c_spec = P("vocab") if vocab_axis else P()
    args = (
      jax.ShapeDtypeStruct((tokens, hidden), dtype, sharding=NamedSharding(mesh, P())),
      jax.ShapeDtypeStruct((classes, hidden), dtype, sharding=NamedSharding(mesh, c_spec)),
      jax.ShapeDtypeStruct((tokens,), jnp.int32, sharding=NamedSharding(mesh, P())),
    )
    fn = loss_fn(point.impl, SOFTCAPS[point.softcap], mesh, vocab_axis)
    if point.mode == "loss+grad":
      fn = jax.value_and_grad(fn, argnums=(0, 1))
    with jax.set_mesh(mesh):
      compiled = jax.jit(fn).lower(*args).compile()
    report = tpu.compile_report(compiled)
    row.update(dataclasses.asdict(report))
    row["peak_bytes"] = report.peak_bytes
    row["has_loops"] = " while(" in compiled.as_text()
  except Exception as err:  # a row, not a crash: the rest of the grid still compiles
    row["error"] = error_text(err)
  row["compile_seconds"] = round(time.perf_counter() - start, 1)
  return row


def grid(values: dict[str, Sequence[str]]) -> list[Point]:
  """Every point of the cross product (``pallas_tpu`` and ``xla`` only where they apply)."""
  names = ("generations", "impls", "modes", "dtypes", "softcap", "shapes", "layouts")
  return [Point(*combo) for combo in itertools.product(*(values[name] for name in names))]


def _mib(value: float | None) -> str:
  return "-" if value is None else f"{value / MIB:,.1f} MiB"


def markdown(rows: list[dict[str, Any]]) -> str:
  """The rows as a Markdown table (per device)."""
  lines = [
    "| TPU | topology | impl | mode | dtype | softcap | N x D x V | layout | temp | peak "
    "| flops | HBM bytes | estimate |",
    "|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|",
  ]
  for row in rows:
    shape = "x".join(str(n) for n in SHAPES[row["shape"]])
    head = (
      f"| {row['generation']} | {row['topology']} | {row['impl']} | {row['mode']} | "
      f"{row['dtype']} | {row['softcap']} | {shape} | {row['layout']} |"
    )
    if "error" in row:
      lines.append(f"{head} error: {row['error'][:120]} | | | | |")
      continue
    loops = " (1 iter.)" if row["has_loops"] else ""
    flops = "-" if row["flops"] is None else f"{row['flops'] / 1e12:.2f} T{loops}"
    moved = "-" if row["bytes_accessed"] is None else f"{row['bytes_accessed'] / 1e9:.2f} GB{loops}"
    seconds = None if row["has_loops"] else row["estimated_seconds"]
    estimate = (
      "(loops)" if row["has_loops"] else "-" if seconds is None else f"{seconds * 1e3:.1f} ms"
    )
    lines.append(
      f"{head} {_mib(row['temp_bytes'])} | {_mib(row['peak_bytes'])} | {flops} | {moved} | "
      f"{estimate} |"
    )
  return "\n".join(lines)


def versions() -> dict[str, str]:
  """Today's date and the versions of jax and libtpu, as the JSON and the section record them."""
  from importlib import metadata

  try:
    libtpu = metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    libtpu = "not installed"
  return {"date": datetime.date.today().isoformat(), "jax": jax.__version__, "libtpu": libtpu}


def section(rows: list[dict[str, Any]], commands: Sequence[str], made: dict[str, str]) -> str:
  """The RESULTS.md section: what the numbers are, the commands that made them, the table."""
  text = (
    f"{made['date']}, jax {made['jax']}, libtpu {made['libtpu']}, compiled on a CPU host for "
    "TPU topologies; nothing ran on a TPU. Per device: temporaries and peak (arguments + "
    "outputs + temporaries) of `memory_analysis()`, flops and HBM bytes of XLA:TPU's cost "
    "analysis, and its own time estimate (`optimal_seconds`), which is a model, not a "
    "measurement. XLA:TPU counts a while loop's body once and gives no estimate for a "
    'program with loops: "(1 iter.)" marks such numbers and "(loops)" the missing estimate '
    '(`impl="xla"` loops over vocabulary and token blocks). "-" is an estimate that came out '
    "negative, as it does for some programs with two Mosaic kernels (`pallas_tpu`'s loss+grad "
    "on one chip; `docs/tpu_backend.md` adds up the kernels' own estimates). Made by:"
  )
  return "\n".join(
    [
      BEGIN,
      "## TPU compiler estimates (not runs): `python benchmarks/tpu_aot.py`",
      "",
      textwrap.fill(text, width=100),
      "",
      *(f"    {command}" for command in commands),
      "",
      markdown(rows),
      END,
    ]
  )


def rewrite_results(path: pathlib.Path, text: str) -> None:
  """Replaces the section between :data:`BEGIN` and :data:`END` of ``path`` (appends it when
  absent), leaving the rest of the file as it was."""
  old = path.read_text() if path.exists() else ""
  if BEGIN in old and END in old:
    before, rest = old.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    new = before + text + after
  else:
    new = old.rstrip("\n") + "\n\n" + text + "\n"
  path.write_text(new)


def render(paths: Sequence[pathlib.Path], results: pathlib.Path | None) -> int:
  """Prints the rows of earlier ``--json`` files as one table (by generation, impl, mode and
  layout); rewrites ``results``' section.

  Returns 2 (with one line) for a file that is missing or not such JSON.
  """
  rows, commands, made = [], [], {}
  for path in paths:
    try:
      saved = json.loads(path.read_text())
      rows.extend(saved["rows"])
      commands.append(saved["command"])
      made = {key: saved[key] for key in ("date", "jax", "libtpu")}
    except (OSError, ValueError, KeyError, TypeError) as err:
      print(f"--render {path}: not a benchmarks/tpu_aot.py --json file ({err})", file=sys.stderr)
      return 2
  order = {"generation": GENERATIONS, "impl": IMPLS, "mode": MODES, "layout": tuple(LAYOUTS)}
  rows.sort(key=lambda row: tuple(values.index(row[key]) for key, values in order.items()))
  print(markdown(rows))
  if results:
    listed = " ".join(str(path) for path in paths)
    render_command = f"python benchmarks/tpu_aot.py --render {listed} --results {results}"
    rewrite_results(results, section(rows, [*commands, render_command], made))
  return 0


def _list(name: str):
  def parse(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in CHOICES[name]]
    if bad or not values:
      raise argparse.ArgumentTypeError(
        f"--{name}: {', '.join(bad) or 'nothing'} is not among {', '.join(CHOICES[name])}"
      )
    return values

  return parse


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, default in DEFAULTS.items():
    parser.add_argument(
      f"--{name}",
      type=_list(name),
      default=default,
      help=f"comma-separated, of {', '.join(CHOICES[name])} (default {','.join(default)})",
    )
  parser.add_argument("--full", action="store_true", help="every value of every axis")
  parser.add_argument(
    "--render",
    type=pathlib.Path,
    nargs="+",
    metavar="JSON",
    help="compile nothing: print (and with --results write) the rows of these --json files",
  )
  parser.add_argument("--json", type=pathlib.Path, help="write the rows as JSON here")
  parser.add_argument(
    "--results", type=pathlib.Path, help="rewrite this file's TPU compiler section (RESULTS.md)"
  )
  args = parser.parse_args(argv)
  if args.render:
    return render(args.render, args.results)
  if not tpu.has_libtpu():
    print(f"benchmarks/tpu_aot.py needs libtpu: {tpu.INSTALL_HINT}", file=sys.stderr)
    return 2
  values = CHOICES if args.full else {name: getattr(args, name) for name in DEFAULTS}
  rows = []
  for point in grid(values):
    row = compile_point(point)
    rows.append(row)
    status = row.get("error") or (
      f"temp {_mib(row['temp_bytes'])}, estimate {row['estimated_seconds']}"
    )
    print(f"{point} [{row['compile_seconds']} s]: {status}", file=sys.stderr, flush=True)
  table = markdown(rows)
  print(table)
  argv_text = " ".join(sys.argv[1:] if argv is None else argv)
  command = f"JAX_PLATFORMS=cpu python benchmarks/tpu_aot.py {argv_text}".strip()
  made = versions()
  if args.json:
    saved = {"command": command, **made, "rows": rows}
    args.json.write_text(json.dumps(saved, indent=1) + "\n")
  if args.results:
    rewrite_results(args.results, section(rows, [command], made))
  return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
