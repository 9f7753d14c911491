"""XLA:GPU deviceless compiler numbers of the loss, for A100 (sm_80) and H100 (sm_90a).

Compiles (never runs) the loss on a host without a GPU (``cce_jax.aot.gpu``; needs
``pip install -e ".[gpu-aot]"``, ptxas and libdevice, ``JAX_PLATFORMS=cpu``) for

* the materialized baseline (f32 logits + optax), ``impl="xla"`` and ``impl="pallas_gpu"``;
* the loss alone and loss + gradient (w.r.t. ``e`` and ``c``);
* float32 and bfloat16 inputs, softcap off and 30.0;
* the paper's shape (N=8192, D=2304, V=256000: Gemma 2) and Llama 3's (8192, 4096, 128256);
* one GPU, and vocabulary-parallel over 4 GPUs (``c`` split along V, ``vocab_axis``),

and prints per-device temporary memory (what XLA:GPU plans, without autotuning) and the
generic HLO cost model's flops and bytes (which count a loop body once and a Pallas kernel
not at all: lower bounds for ``xla`` and ``pallas_gpu``), as
JSON lines; ``--json`` writes them all, ``--results`` rewrites this script's section of
``benchmarks/RESULTS.md`` (between its markers; the rest of the file is kept). These are
compiler numbers, not runs: they say what compiles and the memory the compiler plans, not
speed::

    JAX_PLATFORMS=cpu python benchmarks/gpu_aot.py --json benchmarks/gpu_aot.json \
        --results benchmarks/RESULTS.md

Flags narrow the grid (``--gpus h100 --impls xla,pallas_gpu --dtypes bf16 ...``). A failed
compile is a row with its error; the exit status is 1 when any row failed, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pathlib
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

if __package__ in (None, ""):  # run as a script: the repository root on the path
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cce_jax
from cce_jax.aot import gpu

IGNORE_INDEX = -100
SOFTCAP = 30.0
SHAPES = {"paper": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}  # (N, D, V)
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
IMPLS = ("baseline", "xla", "pallas_gpu")
MODES = ("loss", "loss+grad")
LAYOUTS = {"single": 1, "vocab4": 4}  # name -> GPUs (vocab4: c split 4 ways along V)
GPUS = ("a100", "h100")
VOCAB_AXIS = "vocab"
_COMMAND = (
  "python benchmarks/gpu_aot.py --json benchmarks/gpu_aot.json --results benchmarks/RESULTS.md"
)
BEGIN, END = "<!-- gpu_aot:begin -->", "<!-- gpu_aot:end -->"
MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Case:
  """One compile of the grid."""

  gpu: str
  impl: str
  mode: str
  dtype: str
  softcap: bool
  shape: str
  layout: str


def baseline_loss(e: jax.Array, c: jax.Array, labels: jax.Array, softcap: float | None):
  """Masked mean cross-entropy of the materialized f32 logits (N, V), softcapped if asked."""
  logits = (e @ c.T).astype(jnp.float32)  # (N, V)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  valid = labels != IGNORE_INDEX
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
  return jnp.sum(jnp.where(valid, per_token, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def loss_fn(case: Case, mesh: jax.sharding.Mesh) -> Callable[..., jax.Array]:
  """(e (N, D), c (V, D), labels (N,)) -> the scalar loss of ``case``."""
  softcap = SOFTCAP if case.softcap else None
  if case.impl == "baseline":
    return lambda e, c, labels: baseline_loss(e, c, labels, softcap)
  vocab = {} if case.layout == "single" else {"mesh": mesh, "vocab_axis": VOCAB_AXIS}

  def loss(e, c, labels):
    return cce_jax.linear_cross_entropy(
      e, c, labels, impl=case.impl, softcap=softcap, ignore_index=IGNORE_INDEX, **vocab
    )

  return loss


def lower_case(case: Case) -> tuple[Any, jax.sharding.Mesh]:
  """The lowered program of ``case`` on deviceless GPUs, and its mesh."""
  mesh = gpu.gpu_mesh(case.gpu, {VOCAB_AXIS: LAYOUTS[case.layout]})
  n, d, v = SHAPES[case.shape]
  dtype = DTYPES[case.dtype]
  e = gpu.abstract(mesh, (n, d), dtype)  # (N, D), replicated
  split = P(VOCAB_AXIS) if LAYOUTS[case.layout] > 1 else P()
  c = gpu.abstract(mesh, (v, d), dtype, split)  # (V, D), split along V in vocab4
  labels = gpu.abstract(mesh, (n,), jnp.int32)  # (N,)
  fn = loss_fn(case, mesh)
  if case.mode == "loss+grad":
    fn = jax.value_and_grad(fn, argnums=(0, 1))
  with gpu.lowering_context(mesh):
    return jax.jit(fn).lower(e, c, labels), mesh


def measure(case: Case) -> dict[str, Any]:
  """One row: the case, compile seconds, per-device memory, flops and bytes (or the error)."""
  row: dict[str, Any] = dataclasses.asdict(case)
  row["arch"] = gpu.target(case.gpu).arch
  start = time.perf_counter()
  try:
    lowered, _ = lower_case(case)
    compiled = gpu.compile_lowered(lowered)
  except gpu.GpuAotUnavailable:
    raise
  except Exception as error:
    row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    return row
  row["compile_s"] = round(time.perf_counter() - start, 2)
  report = gpu.compile_report(compiled)
  row.update(
    argument_bytes=report.argument_bytes,
    temp_bytes=report.temp_bytes,
    output_bytes=report.output_bytes,
    flops=report.flops,
    bytes_accessed=report.bytes_accessed,
  )
  return row


def _mib(value: int | float | None) -> str:
  return "n/a" if value is None else f"{value / MIB:.1f}"


def _g(value: float | None) -> str:
  return "n/a" if value is None else f"{value / 1e9:.1f}"


def markdown(rows: Sequence[dict[str, Any]], command: str) -> str:
  """The RESULTS.md section of ``rows`` (between :data:`BEGIN` and :data:`END`)."""
  intro = [
    BEGIN,
    "## XLA:GPU deviceless compiler numbers (not runs): `python benchmarks/gpu_aot.py`",
    "",
    f"jax {jax.__version__} with its CUDA plugin, on a 2-core CPU host: `{command}` (the grid "
    "was compiled in parts with `--merge`; `--tabulate` rewrites this section from the JSON). "
    "Each row is one "
    "program compiled by the real XLA:GPU pipeline for the target GPU (Triton and LLVM to "
    "PTX, ptxas to a cubin) and never run: temp is the per-device temporary memory XLA:GPU "
    "plans without autotuning (it needs a device), GFLOP and GB the generic HLO cost model's "
    "flops and bytes accessed per device. That model counts a while loop's body once, not per "
    "iteration, and custom calls (the Pallas kernels) not at all: only the baseline's numbers "
    "(no loops) are the whole program's; xla's and pallas_gpu's are what lies outside their "
    "loops and kernels, lower bounds, not comparable with it. What this proves: the kernels "
    "compile for sm_80 and sm_90a, and the memory the compiler plans. What it does not: "
    "speed. vocab4 is vocabulary-parallel over 4 GPUs (c split along V; per-device numbers). "
    "With 16-bit inputs pallas_gpu's dC kernel keeps one f32 (32, D) buffer per persistent "
    "program (one program per SM), not an f32 (V, D) accumulator (which took 2250 MiB at the "
    "paper's shape and 2004 MiB at Llama 3's before).",
    "",
  ]
  lines = [
    *intro[:3],
    textwrap.fill(intro[3], width=100, break_on_hyphens=False, break_long_words=False),
    *intro[4:],
    *summary(rows),
    "All rows:",
    "",
    "| gpu | shape | dtype | softcap | layout | mode | impl | temp MiB | GFLOP | GB | compile s |",
    "|---|---|---|---|---|---|---|---:|---:|---:|---:|",
  ]
  for row in rows:
    n, d, v = SHAPES[row["shape"]]
    head = (
      f"| {row['gpu']} ({row['arch']}) | {row['shape']} {n}x{d}x{v} | {row['dtype']} | "
      f"{'30' if row['softcap'] else 'off'} | {row['layout']} | {row['mode']} | {row['impl']} |"
    )
    if "error" in row:
      lines.append(f"{head} failed: {row['error'][:120]} | | | |")
    else:
      lines.append(
        f"{head} {_mib(row['temp_bytes'])} | {_g(row['flops'])} | "
        f"{_g(row['bytes_accessed'])} | {row['compile_s']} |"
      )
  lines.append(END)
  return "\n".join(lines) + "\n"


def summary(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Markdown lines: loss+grad temp MiB per impl, one GPU, softcap off, with xla's and
  pallas_gpu's share of the baseline's (where the rows hold all three)."""
  temps: dict[tuple, dict[str, int]] = {}
  for row in rows:
    if row["mode"] == "loss+grad" and row["layout"] == "single" and not row["softcap"]:
      key = (row["gpu"], row["arch"], row["shape"], row["dtype"])
      temps.setdefault(key, {})[row["impl"]] = row.get("temp_bytes")
  lines = [
    "Loss + gradient, one GPU, softcap off: per-device temporary MiB (share of the baseline's):",
    "",
    "| gpu | shape | dtype | baseline | xla | pallas_gpu |",
    "|---|---|---|---:|---:|---:|",
  ]
  for (name, arch, shape, dtype), by_impl in temps.items():
    base = by_impl.get("baseline")
    cells = []
    for impl in IMPLS:
      value = by_impl.get(impl)
      share = f" ({100 * value / base:.1f}%)" if value and base and impl != "baseline" else ""
      cells.append(f"{_mib(value)}{share}" if value is not None else "failed")
    lines.append(f"| {name} ({arch}) | {shape} | {dtype} | " + " | ".join(cells) + " |")
  return [*lines, ""]


def write_section(path: pathlib.Path, section: str) -> None:
  """Replaces the text between :data:`BEGIN` and :data:`END` in ``path`` by ``section`` (which
  holds both markers), or appends ``section`` where the markers are absent."""
  text = path.read_text() if path.exists() else ""
  if BEGIN in text and END in text:
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1].lstrip("\n")
    text = before + section + ("\n" + after if after else "")
  else:
    text = text.rstrip("\n") + ("\n\n" if text else "") + section
  path.write_text(text)


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
  def parse(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if item not in allowed]
    if bad or not items:
      raise argparse.ArgumentTypeError(f"expected a comma list of {list(allowed)}, got {text!r}")
    return items

  return parse


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  grid = {
    "gpus": GPUS,
    "impls": IMPLS,
    "modes": MODES,
    "dtypes": tuple(DTYPES),
    "softcaps": ("off", "on"),
    "shapes": tuple(SHAPES),
    "layouts": tuple(LAYOUTS),
  }
  for name, allowed in grid.items():
    parser.add_argument(
      f"--{name}",
      type=_choices(allowed),
      default=list(allowed),
      help=f"comma list of {','.join(allowed)} (default: all)",
    )
  parser.add_argument("--json", type=pathlib.Path, help="write all rows as JSON here")
  parser.add_argument(
    "--merge",
    action="store_true",
    help="keep the rows of an existing --json file (a row of the same case is replaced), so "
    "that a grid can be compiled in parts; --results then tabulates them all",
  )
  parser.add_argument(
    "--results", type=pathlib.Path, help="rewrite this script's section of this RESULTS.md"
  )
  parser.add_argument(
    "--tabulate",
    action="store_true",
    help="compile nothing: write --results from the rows of the --json file",
  )
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.tabulate:
    if not (args.json and args.json.exists() and args.results):
      parser.error("--tabulate needs an existing --json file and --results")
    rows = json.loads(args.json.read_text())
    write_section(args.results, markdown(rows, _COMMAND))
    return 0
  cases = [
    Case(g, impl, mode, dtype, softcap == "on", shape, layout)
    for g, shape, dtype, softcap, layout, mode, impl in itertools.product(
      args.gpus, args.shapes, args.dtypes, args.softcaps, args.layouts, args.modes, args.impls
    )
  ]
  rows = []
  try:
    for case in cases:
      row = measure(case)
      print(json.dumps(row), flush=True)
      rows.append(row)
  except gpu.GpuAotUnavailable as error:
    print(f"gpu_aot: {error}", file=sys.stderr)
    return 2
  failed = any("error" in row for row in rows)
  if args.merge and args.json and args.json.exists():
    rows = merge_rows(json.loads(args.json.read_text()), rows)
  if args.json:
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
  if args.results:
    write_section(args.results, markdown(rows, _COMMAND))
  return 1 if failed else 0


def case_key(row: dict[str, Any]) -> tuple:
  """The :class:`Case` fields of a row."""
  return tuple(row[field.name] for field in dataclasses.fields(Case))


def merge_rows(old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict]:
  """``old`` rows with those of ``new``'s cases replaced, then ``new``'s other rows, in the
  grid's order (GPU, shape, dtype, softcap, layout, mode, impl)."""
  merged = {case_key(row): row for row in old}
  merged.update((case_key(row), row) for row in new)
  order = {
    "gpu": GPUS,
    "shape": tuple(SHAPES),
    "dtype": tuple(DTYPES),
    "softcap": (False, True),
    "layout": tuple(LAYOUTS),
    "mode": MODES,
    "impl": IMPLS,
  }
  return sorted(
    merged.values(), key=lambda row: tuple(values.index(row[k]) for k, values in order.items())
  )


if __name__ == "__main__":
  sys.exit(main())
