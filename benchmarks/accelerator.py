"""One command for a GPU or TPU host: check, time, sweep and (with ``--apply``) tune cce_jax.

  python benchmarks/accelerator.py                  # on the accelerator host, < 10 minutes
  python benchmarks/accelerator.py --apply          # also record the winners in cce_jax/tuned.json
  python benchmarks/accelerator.py --smoke          # on a CPU: tiny shapes, Pallas interpreted

Needs JAX for the host's accelerator and this repository (no network, no extra package;
apple's ``cut_cross_entropy`` is timed too when ``torch`` and it import, see
``benchmarks/gpu.py`` for installing it offline). Steps, in order:

1. **Check**: every implementation of the backend (``xla`` and the backend's Pallas kernel,
   ``pallas_gpu`` or ``pallas_tpu``) against ``impl="reference"``: loss and both gradients, f32
   and bf16, ragged sizes (no size a multiple of a block), filtering on and off, within the
   norm-relative ``TOLERANCES``. A mismatch stops the script with exit status 1 and the case
   that failed; nothing is written.
2. **Time**: loss and loss+grad (w.r.t. ``e`` and ``c``) of the materialized ``baseline``,
   ``xla`` and the Pallas kernel (default options; ``apple-cce`` on a GPU when importable) at
   the paper's shape (N=8192, D=2304, V=256000) and Llama 3's (N=8192, D=4096, V=128256), bf16,
   uniform and trained-like inputs (``cce_jax.synthetic``): median of ``--repeats`` calls after a
   warm-up, the compiled temporaries (``memory_analysis()``), and the device's peak bytes in
   use (``memory_stats()``, cumulative over the process: a ceiling).
3. **Sweep**: loss+grad of a small grid of block sizes for ``xla`` and the Pallas kernel
   (besides its defaults, timed in step 2), trained-like inputs at both shapes.
4. **Report**: ``--out-dir/accelerator-<device kind>-<date>.json`` and ``.md`` (device kind,
   JAX version, date, every row); the Markdown also goes to stdout. Paste it into
   ``benchmarks/RESULTS.md``.
5. **--apply**: for the device kind and bf16, writes into ``cce_jax/tuned.json`` the ``xla``
   tiles that were fastest summed over both shapes, and ``impl`` = the Pallas kernel only when
   it passed the check and, with its default tiles, beat ``xla`` at every shape and input
   (both ``xla``'s default and its fastest tiles);
   ``BlockSizes.get_default`` and ``impl="auto"`` read that table.

On a CPU without ``--smoke`` it refuses to run (exit status 2).
"""

from __future__ import annotations

import os

# Torch and JAX may share the GPU: JAX must not pre-allocate most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import datetime
import json
import pathlib
import platform
import re
import statistics
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import IGNORE_INDEX, baseline_loss, error_text
from gpu import JaxRunner, Runner, TorchRunner, load_apple

import cce_jax
from cce_jax import synthetic, tuned

ROOT = pathlib.Path(__file__).resolve().parent.parent
TUNED_PATH = ROOT / "cce_jax" / tuned.TABLE_NAME
SHAPES = {"paper": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}
SMOKE_SHAPES = {"smoke": (256, 128, 1000)}
# Ragged check sizes (N, D, V): no size a multiple of any block.
CHECK_SHAPE = (1000, 200, 5003)
SMOKE_CHECK_SHAPE = (77, 40, 301)
# Norm-relative tolerances against impl="reference" per dtype: (loss, gradients). On a GPU or
# TPU, float32 products may run as TF32 (Triton's default) or bf16 passes where a kernel does
# not ask for full precision: float32 then gets ACCELERATOR_F32_TOLERANCE. A bug is off by far
# more than either.
TOLERANCES = {"float32": (2e-5, 1e-4), "bfloat16": (2e-3, 3e-2)}
ACCELERATOR_F32_TOLERANCE = (1e-3, 1e-2)
DISTRIBUTIONS = {
  "uniform": synthetic.uniform_inputs,
  "trained": synthetic.trained_like_inputs,
}
XLA_SWEEP = ((256, 512), (512, 2048), (1024, 2048), (1024, 4096), (1024, 8192))
SMOKE_XLA_SWEEP = ((64, 128),)
PALLAS_BY_BACKEND = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}


def pallas_sweep(impl: str, smoke: bool) -> list[dict[str, Any]]:
  """Keyword arguments of the Pallas kernel's block-size dataclass to sweep besides its
  defaults (timed in step 2, the trained-like rows)."""
  if impl == "pallas_gpu":
    grid = [{"token_block": 128, "vocab_block": 128}, {"token_block": 64, "vocab_block": 256}]
    return grid[:1] if smoke else grid
  mib = 1024 * 1024
  grid = [{"vmem_budget_bytes": 32 * mib}, {"token_block": 1024, "vmem_budget_bytes": 32 * mib}]
  return [{"token_block": 128, "vocab_block": 128}] if smoke else grid


def pallas_block_sizes(impl: str, kwargs: dict[str, Any]):
  """The Pallas block-size dataclass of ``impl`` built from ``kwargs``."""
  if impl == "pallas_gpu":
    from pallas_kernels.gpu import GPUBlockSizes

    return GPUBlockSizes(**kwargs)
  from pallas_kernels.tpu import TPUBlockSizes

  return TPUBlockSizes(**kwargs)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What this run measures: the backend's implementations, shapes and grids."""

  backend: str
  device_kind: str
  pallas: tuple[str, ...]
  interpret: bool
  shapes: dict[str, tuple[int, int, int]]
  check_shape: tuple[int, int, int]
  xla_sweep: tuple[tuple[int, int], ...]
  repeats: int


def make_setup(args: argparse.Namespace) -> Setup:
  backend = jax.default_backend()
  backend = "gpu" if backend in ("cuda", "rocm") else backend
  if args.smoke:
    # On a CPU, pallas_gpu in interpret mode stands in for the backend's kernel (pallas_tpu's
    # interpret mode is slower; tests/test_pallas_tpu.py covers it).
    pallas = PALLAS_BY_BACKEND.get(backend, "pallas_gpu")
    return Setup(
      backend,
      jax.devices()[0].device_kind,
      (pallas,),
      backend == "cpu",
      SMOKE_SHAPES,
      SMOKE_CHECK_SHAPE,
      SMOKE_XLA_SWEEP,
      1,
    )
  pallas = (PALLAS_BY_BACKEND[backend],)
  return Setup(
    backend,
    jax.devices()[0].device_kind,
    pallas,
    False,
    SHAPES,
    CHECK_SHAPE,
    XLA_SWEEP,
    args.repeats,
  )


def loss_fn(impl: str, interpret: bool, **options: Any) -> Callable[..., jax.Array]:
  """(e, c, labels) -> loss of ``linear_cross_entropy(impl=impl, **options)``."""
  extra = {"interpret": True} if interpret and impl.startswith("pallas") else {}

  def loss(e, c, labels):
    return cce_jax.linear_cross_entropy(
      e, c, labels, impl=impl, ignore_index=IGNORE_INDEX, **extra, **options
    )

  return loss


# ---- 1. correctness ---------------------------------------------------------------------


class Mismatch(Exception):
  """An implementation disagrees with impl="reference"."""


def relative_error(actual, expected) -> float:
  """||actual - expected|| / ||expected|| in float64."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def check(setup: Setup) -> list[dict[str, Any]]:
  """Checks every implementation against impl="reference" (module doc, step 1).

  Raises:
    Mismatch: the first case outside ``TOLERANCES``, named in the message.
  """
  n, d, v = setup.check_shape
  tolerances = TOLERANCES | ({} if setup.interpret else {"float32": ACCELERATOR_F32_TOLERANCE})
  rows = []
  for dtype in ("float32", "bfloat16"):
    e, c, labels = synthetic.trained_like_inputs(jax.random.key(1), n, d, v, jnp.dtype(dtype))
    labels = labels.at[::7].set(IGNORE_INDEX)  # ignored tokens too
    # The reference is exact whatever filter_eps says: one computation serves both settings.
    reference = loss_fn("reference", setup.interpret)
    want_loss, (want_de, want_dc) = jax.value_and_grad(reference, (0, 1))(e, c, labels)
    for filter_eps in ("auto", None):
      for impl in ("xla", *setup.pallas):
        fn = loss_fn(impl, setup.interpret, filter_eps=filter_eps)
        loss, (d_e, d_c) = jax.jit(jax.value_and_grad(fn, (0, 1)))(e, c, labels)
        errors = {
          "loss": relative_error(loss, want_loss),
          "d_e": relative_error(d_e, want_de),
          "d_c": relative_error(d_c, want_dc),
        }
        row = {"impl": impl, "dtype": dtype, "filter_eps": filter_eps, "shape": [n, d, v]}
        rows.append(row | {"rel_errors": errors})
        loss_tol, grad_tol = tolerances[dtype]
        for name, err in errors.items():
          tol = loss_tol if name == "loss" else grad_tol
          if not err <= tol:  # also catches NaN
            raise Mismatch(
              f"{impl} {dtype} filter_eps={filter_eps} N,D,V={n},{d},{v}: {name} relative "
              f"error {err:.3g} > {tol:.3g} against impl='reference'"
            )
  return rows


# ---- 2. and 3. timings --------------------------------------------------------------------


def peak_bytes() -> int | None:
  """``peak_bytes_in_use`` of the first device so far (None where not reported)."""
  return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def measure(runners: list[Runner], repeats: int) -> list[dict[str, Any]]:
  """Median loss and loss+grad ms of each runner, calls interleaved."""
  for _ in range(repeats):
    for runner in runners:
      runner.result["loss_times_ms"].append(runner.time_loss())
      runner.result["grad_times_ms"].append(runner.time_grad())
  rows = []
  for runner in runners:
    row = runner.result
    row["loss_ms"] = statistics.median(row.pop("loss_times_ms"))
    row["grad_ms"] = statistics.median(row.pop("grad_times_ms"))
    rows.append(row)
  return rows


def jax_runner(name: str, fn: Callable[..., jax.Array], args: tuple) -> Runner:
  """A compiled :class:`gpu.JaxRunner` with its temporaries and the device peak recorded."""
  runner = JaxRunner(name, fn, args)
  for key, compiled in (("loss", runner.loss), ("grad", runner.grad)):
    stats = compiled.memory_analysis()
    if stats is not None:
      runner.result[f"{key}_temp_bytes"] = int(stats.temp_size_in_bytes)
  runner.result["peak_bytes"] = peak_bytes()
  return runner


def time_shapes(setup: Setup, apple: Any) -> list[dict[str, Any]]:
  """Step 2: every implementation at every shape and input distribution, bf16."""
  rows = []
  for shape_name, (n, d, v) in setup.shapes.items():
    for dist, make in DISTRIBUTIONS.items():
      e, c, labels = jax.block_until_ready(make(jax.random.key(0), n, d, v, jnp.bfloat16))
      where = {"shape": shape_name, "dist": dist}
      impls = {"baseline": baseline_loss, "xla": loss_fn("xla", setup.interpret)}
      impls |= {impl: loss_fn(impl, setup.interpret) for impl in setup.pallas}
      runners, failed = [], []
      for name, fn in impls.items():
        try:
          runners.append(jax_runner(name, fn, (e, c, labels)))
        except Exception as err:  # out of memory, say: recorded, never fatal
          failed.append({"impl": name, "error": error_text(err)})
      if not isinstance(apple, str):
        try:
          runners.append(TorchRunner("apple-cce", *apple, "cce", e, c, labels, "bf16"))
        except Exception as err:
          failed.append({"impl": "apple-cce", "error": error_text(err)})
      for row in measure(runners, setup.repeats) + failed:
        rows.append(where | row)
      print(f"  timed {shape_name} {dist}", file=sys.stderr, flush=True)
  return rows


def sweep(setup: Setup) -> list[dict[str, Any]]:
  """Step 3: loss+grad over block-size grids of xla and the Pallas kernel, trained-like."""
  rows = []
  for shape_name, (n, d, v) in setup.shapes.items():
    args = synthetic.trained_like_inputs(jax.random.key(0), n, d, v, jnp.bfloat16)
    runners, failed = [], []
    for token_block, vocab_block in setup.xla_sweep:
      sizes = cce_jax.BlockSizes(token_block=token_block, vocab_block=vocab_block)
      name = f"xla {token_block}x{vocab_block}"
      try:
        runners.append(jax_runner(name, loss_fn("xla", setup.interpret, block_sizes=sizes), args))
        runners[-1].result["block_sizes"] = dataclasses.asdict(sizes)
      except Exception as err:  # out of memory, say: recorded, never fatal
        failed.append({"impl": name, "error": error_text(err)})
    for impl in setup.pallas:
      for kwargs in pallas_sweep(impl, setup.interpret):
        name = f"{impl} {kwargs}"
        try:
          fn = loss_fn(impl, setup.interpret, block_sizes=pallas_block_sizes(impl, kwargs))
          runners.append(jax_runner(name, fn, args))
          runners[-1].result["block_sizes"] = kwargs
        except Exception as err:  # tiles this device cannot hold: recorded, never fatal
          failed.append({"impl": name, "error": error_text(err)})
    rows += [{"shape": shape_name, "dist": "trained"} | r for r in measure(runners, setup.repeats)]
    rows += [{"shape": shape_name, "dist": "trained"} | r for r in failed]
    print(f"  swept {shape_name}", file=sys.stderr, flush=True)
  return rows


# ---- 4. report and 5. apply ---------------------------------------------------------------


def _cell(row: dict[str, Any], key: str, scale: float, fmt: str) -> str:
  value = row.get(key)
  return "-" if value is None else format(value / scale, fmt)


def markdown(record: dict[str, Any]) -> str:
  """The report's Markdown: header, timings, sweep."""
  lines = [
    f"## {record['date']}: {record['device_kind']} ({record['backend']}), jax {record['jax']}",
    "",
    f"Check against impl='reference': {len(record['check'])} cases passed.",
    "",
    "| shape | inputs | impl | loss ms | loss+grad ms | loss temp MB | loss+grad temp MB "
    "| peak MB |",
    "|---|---|---|---:|---:|---:|---:|---:|",
  ]
  for row in record["timings"] + record["sweep"]:
    if "error" in row:
      lines.append(
        f"| {row['shape']} | {row['dist']} | {row['impl']} | error: {row['error']} | | | | |"
      )
      continue
    lines.append(
      f"| {row['shape']} | {row['dist']} | {row['impl']} | {row['loss_ms']:.2f} | "
      f"{row['grad_ms']:.2f} | {_cell(row, 'loss_temp_bytes', 1e6, '.1f')} | "
      f"{_cell(row, 'grad_temp_bytes', 1e6, '.1f')} | {_cell(row, 'peak_bytes', 1e6, '.0f')} |"
    )
  if record.get("winners"):
    lines += ["", f"Winners: `{json.dumps(record['winners'])}`"]
  return "\n".join(lines)


def _grad_ms(rows: list[dict[str, Any]], impl: str, **where: str) -> float | None:
  """loss+grad ms of the row of ``impl`` matching ``where``, None when absent or failed."""
  for row in rows:
    if row["impl"] == impl and "error" not in row and all(row[k] == v for k, v in where.items()):
      return row["grad_ms"]
  return None


def winners(record: dict[str, Any], pallas: tuple[str, ...]) -> dict[str, Any]:
  """The bf16 entry ``--apply`` writes (module doc, step 5)."""
  totals: dict[tuple[int, int], float] = {}
  for row in record["sweep"]:
    if row["impl"].startswith("xla ") and "error" not in row:
      tiles = (row["block_sizes"]["token_block"], row["block_sizes"]["vocab_block"])
      totals[tiles] = totals.get(tiles, 0.0) + row["grad_ms"]
  token_block, vocab_block = min(totals, key=totals.get)
  best_xla = f"xla {token_block}x{vocab_block}"
  impl = "xla"
  for candidate in pallas:
    pairs = [
      (
        _grad_ms(record["timings"], candidate, shape=shape, dist="trained"),
        _grad_ms(record["sweep"], best_xla, shape=shape),
      )
      for shape in {row["shape"] for row in record["sweep"]}
    ]
    pairs += [
      (
        _grad_ms(record["timings"], candidate, shape=row["shape"], dist=row["dist"]),
        _grad_ms(record["timings"], "xla", shape=row["shape"], dist=row["dist"]),
      )
      for row in record["timings"]
    ]
    if all(ours is not None and xla is not None and ours < xla for ours, xla in pairs):
      impl = candidate
  return {
    "impl": impl,
    "xla": {"token_block": token_block, "vocab_block": vocab_block},
    "date": record["date"],
    "jax": record["jax"],
  }


def apply(path: pathlib.Path, device_kind: str, entry: dict[str, Any]) -> None:
  """Writes ``entry`` as ``device_kind``'s bf16 entry of the tuned table at ``path``."""
  table = json.loads(path.read_text())
  tuned.check_table(table, str(path))
  table["entries"].setdefault(device_kind, {})["bfloat16"] = entry
  tuned.check_table(table, str(path))
  path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Pallas interpreted")
  parser.add_argument("--apply", action="store_true", help="write the winners to tuned.json")
  parser.add_argument("--tuned", type=pathlib.Path, default=TUNED_PATH, help=argparse.SUPPRESS)
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per implementation")
  parser.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "benchmarks" / "out")
  parser.add_argument("--apple-path", default=None, help="directory holding cut_cross_entropy")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  backend = jax.default_backend()
  if backend == "cpu" and not args.smoke:
    print("accelerator.py: no GPU or TPU here; run it on one, or pass --smoke", file=sys.stderr)
    return 2
  if args.repeats < 1:
    print("accelerator.py: --repeats must be at least 1", file=sys.stderr)
    return 2
  setup = make_setup(args)
  print(f"jax {jax.__version__} on {setup.device_kind} ({setup.backend})", file=sys.stderr)
  record: dict[str, Any] = {
    "device_kind": setup.device_kind,
    "backend": setup.backend,
    "jax": jax.__version__,
    "python": platform.python_version(),
    "date": datetime.date.today().isoformat(),
    "smoke": args.smoke,
  }
  try:
    with jax.default_matmul_precision("highest"):  # XLA's products in full float32
      record["check"] = check(setup)
  except Mismatch as err:
    print(f"accelerator.py: MISMATCH, stopping: {err}", file=sys.stderr)
    return 1
  print(f"  checked {len(record['check'])} cases", file=sys.stderr, flush=True)
  apple = load_apple(args.apple_path) if setup.backend == "gpu" else "not a GPU"
  record["apple"] = apple if isinstance(apple, str) else "timed"
  record["timings"] = time_shapes(setup, apple)
  record["sweep"] = sweep(setup)
  record["winners"] = winners(record, setup.pallas)
  slug = re.sub(r"[^A-Za-z0-9]+", "-", setup.device_kind).strip("-").lower()
  stem = args.out_dir / f"accelerator-{slug}-{record['date']}"
  args.out_dir.mkdir(parents=True, exist_ok=True)
  stem.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str) + "\n")
  text = markdown(record)
  stem.with_suffix(".md").write_text(text + "\n")
  print(text)
  print(f"wrote {stem}.json and .md", file=sys.stderr)
  if args.apply:
    apply(args.tuned, setup.device_kind, record["winners"])
    print(f"applied to {args.tuned}: {setup.device_kind} bfloat16", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
