"""GPU benchmark of ``impl="pallas_gpu"``: speed and memory against xla, the materialized
baseline and apple's Cut Cross-Entropy (PyTorch + Triton), on the same inputs in one run.

The one command that checks, times, sweeps and tunes on any accelerator is
``benchmarks/accelerator.py``; this script is the detailed view of this backend.

Not run yet: written on a machine without a GPU (the kernels were checked there in interpret
mode and by lowering for CUDA). One command on a CUDA host:

  python benchmarks/gpu.py --markdown

Shapes: the paper's (N=8192, D=2304, V=256000, Gemma 2 2B) and a Llama-3 head (N=8192, D=4096,
V=128256), bf16, trained-like logits (``cce_jax.synthetic.trained_like_inputs``, as
``benchmarks/speed.py``). For each, loss and loss+grad (w.r.t. ``e`` and ``c``) of:

* ``pallas_gpu``: ``cce_jax.linear_cross_entropy(impl="pallas_gpu")`` (default options:
  ``filter_eps="auto"``, vocabulary sort); also ``pallas_gpu-exact`` (``filter_eps=None``);
* ``xla``: ``impl="xla"`` (default options);
* ``baseline``: masked mean of ``optax.softmax_cross_entropy_with_integer_labels`` on the
  materialized f32 logits;
* ``apple-cce`` and ``apple-torch_compile``: ``cut_cross_entropy.linear_cross_entropy`` with
  ``impl="cce"`` / ``"torch_compile"`` (needs torch with CUDA and the package; the columns are
  skipped with a message when either is missing, never an error).

Time: the median over ``--repeats`` calls after a warm-up call, the calls of all
implementations interleaved. Torch calls are timed with CUDA events; JAX calls by the host
clock around ``jax.block_until_ready`` (JAX has no event API; its dispatch overhead is tens of
microseconds against kernels of milliseconds).
Memory: what a call needs beyond its inputs: for JAX the compiled temporaries plus outputs
(``compiled.memory_analysis()``), for torch the peak allocated during the call minus what was
allocated before it (``torch.cuda.max_memory_allocated``).

apple's package on a host without network (the GPU hosts have jax, torch and Triton but not
``cut-cross-entropy``)::

  # here (with network):
  pip download --no-deps cut-cross-entropy -d wheels/
  # copy wheels/ to the GPU host, then there:
  pip install --no-deps --target /tmp/apple_cce wheels/cut_cross_entropy-*.whl
  python benchmarks/gpu.py --apple-path /tmp/apple_cce --markdown

Smoke test of the script itself on a CPU (tiny shape, Pallas in interpret mode, no torch):

  python benchmarks/gpu.py --shapes 512x64x4096:bf16 --interpret --repeats 2
"""

from __future__ import annotations

import os

# Torch and JAX share the GPU: JAX must not pre-allocate most of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import datetime
import importlib
import json
import platform
import statistics
import sys
from collections.abc import Callable
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np
from common import DTYPES, IGNORE_INDEX, Shape, baseline_loss, cce_loss, error_text, timed

import cce_jax
from cce_jax import synthetic

DEFAULT_SHAPES = "8192x2304x256000:bf16,8192x4096x128256:bf16"


def parse_shapes(text: str) -> list[Shape]:
  """``"NxDxV:dtype,..."`` (bf16 when the dtype is omitted)."""
  return common.parse_shapes(text, default_dtype="bf16")


# ---- the JAX implementations --------------------------------------------------------------


def jax_impls(interpret: bool) -> dict[str, Callable[..., jax.Array]]:
  pallas = {"interpret": True} if interpret else {}
  return {
    "pallas_gpu": cce_loss("pallas_gpu", **pallas),
    "pallas_gpu-exact": cce_loss("pallas_gpu", filter_eps=None, **pallas),
    "xla": cce_loss("xla"),
    "baseline": baseline_loss,
  }


class Runner:
  """One implementation's loss and loss+grad, compiled, with their memory and timings."""

  def __init__(self, name: str):
    self.name = name
    self.result: dict[str, Any] = {"impl": name, "loss_times_ms": [], "grad_times_ms": []}

  def time_loss(self) -> float:
    raise NotImplementedError

  def time_grad(self) -> float:
    raise NotImplementedError


class JaxRunner(Runner):
  """A JAX loss function, jitted; memory from the compiled executables."""

  def __init__(self, name: str, fn: Callable[..., jax.Array], args: tuple):
    super().__init__(name)
    self.args = args
    loss = jax.jit(fn).lower(*args).compile()
    grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    self.loss, self.grad = loss, grad
    for key, compiled in (("loss", loss), ("grad", grad)):
      stats = compiled.memory_analysis()
      if stats is not None:
        self.result[f"{key}_memory_bytes"] = int(
          stats.temp_size_in_bytes + stats.output_size_in_bytes
        )
    self.result["loss_value"] = float(jax.block_until_ready(loss(*args)))
    jax.block_until_ready(grad(*args))

  def _time(self, fn) -> float:
    return 1e3 * timed(fn, self.args)[0]

  def time_loss(self) -> float:
    return self._time(self.loss)

  def time_grad(self) -> float:
    return self._time(self.grad)


# ---- apple's Cut Cross-Entropy (PyTorch) --------------------------------------------------


def load_apple(apple_path: str | None):
  """(torch, cut_cross_entropy.linear_cross_entropy), or a string saying what is missing."""
  if apple_path:
    sys.path.insert(0, apple_path)
  try:
    torch = importlib.import_module("torch")
  except ImportError:
    return "torch is not installed"
  if not torch.cuda.is_available():
    return "torch sees no CUDA device"
  try:
    apple = importlib.import_module("cut_cross_entropy")
  except ImportError:
    return (
      "cut_cross_entropy is not installed (see this script's docstring: pip download "
      "--no-deps cut-cross-entropy, then --apple-path)"
    )
  return torch, apple.linear_cross_entropy


def to_torch(torch, x: jax.Array, dtype):
  """The same values as a CUDA torch tensor (through DLPack, or host memory as a fallback)."""
  try:
    return torch.from_dlpack(x).to(dtype)
  except Exception:  # an older DLPack without bf16: go through float32 on the host
    return torch.tensor(np.asarray(x.astype(jnp.float32)), device="cuda").to(dtype)


class TorchRunner(Runner):
  """apple's ``linear_cross_entropy(e, c, targets, impl=...)``; CUDA-event timings."""

  def __init__(self, name: str, torch, apple_lce, impl: str, e, c, labels, dtype: str):
    super().__init__(name)
    self.torch = torch
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    self.e = to_torch(torch, e, torch_dtype).requires_grad_(True)
    self.c = to_torch(torch, c, torch_dtype).requires_grad_(True)
    self.labels = to_torch(torch, labels, torch.int64)
    self.fn = lambda: apple_lce(self.e, self.c, self.labels, ignore_index=IGNORE_INDEX, impl=impl)
    with torch.no_grad():
      self.result["loss_value"] = float(self.fn())  # warm-up (and compile)
    self._grad_step()
    self.result["loss_memory_bytes"] = self._memory(lambda: self._no_grad(self.fn))
    self.result["grad_memory_bytes"] = self._memory(self._grad_step)

  def _no_grad(self, fn):
    with self.torch.no_grad():
      return fn()

  def _grad_step(self):
    self.e.grad = self.c.grad = None
    loss = self.fn()
    loss.backward()
    return loss

  def _memory(self, fn) -> int:
    torch = self.torch
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)

  def _time(self, fn) -> float:
    torch = self.torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end))

  def time_loss(self) -> float:
    return self._time(lambda: self._no_grad(self.fn))

  def time_grad(self) -> float:
    return self._time(self._grad_step)


# ---- one shape ------------------------------------------------------------------------------


def pallas_skipped_fraction(e, c, labels, interpret: bool) -> float:
  """Fraction of backward tiles the default pallas_gpu loss skips (its skip table)."""
  stats = cce_jax.filter_stats(
    e, c, labels, ignore_index=IGNORE_INDEX, impl="pallas_gpu", interpret=interpret
  )
  return float(stats["skipped_fraction"])


def run_shape(shape: Shape, args: argparse.Namespace, apple) -> list[dict[str, Any]]:
  key = jax.random.key(args.seed)
  e, c, labels = jax.block_until_ready(
    synthetic.trained_like_inputs(key, shape.n, shape.d, shape.v, dtype=DTYPES[shape.dtype])
  )
  print(f"\n== {shape.label} {shape.dtype} trained-like ==", flush=True)
  runners: list[Runner] = []
  rows: list[dict[str, Any]] = []
  for name, fn in jax_impls(args.interpret).items():
    try:
      runners.append(JaxRunner(name, fn, (e, c, labels)))
    except Exception as err:  # reported, never fatal
      rows.append({"impl": name, "error": error_text(err)})
  if isinstance(apple, str):
    print(f"  apple columns skipped: {apple}")
  else:
    torch, apple_lce = apple
    for impl in ("cce", "torch_compile"):
      name = f"apple-{impl}"
      try:
        runners.append(TorchRunner(name, torch, apple_lce, impl, e, c, labels, shape.dtype))
      except Exception as err:  # reported, never fatal
        rows.append({"impl": name, "error": error_text(err)})
  for _ in range(args.repeats):  # interleaved, so that drifts hit every implementation alike
    for runner in runners:
      runner.result["loss_times_ms"].append(runner.time_loss())
      runner.result["grad_times_ms"].append(runner.time_grad())
  for runner in runners:
    r = runner.result
    r["loss_ms"] = statistics.median(r["loss_times_ms"])
    r["grad_ms"] = statistics.median(r["grad_times_ms"])
    rows.append(r)
  skipped = pallas_skipped_fraction(e, c, labels, args.interpret)
  for row in rows:
    row.update(shape=shape.label, dtype=shape.dtype)
    if row["impl"] == "pallas_gpu":
      row["skipped_fraction"] = skipped
  return rows


# ---- report ----------------------------------------------------------------------------------


def _ms(row, key):
  return f"{row[key]:.2f}" if key in row else "-"


def _mb(row, key):
  return f"{row[key] / 1e6:.1f}" if key in row else "-"


def format_table(rows: list[dict[str, Any]], markdown: bool) -> str:
  header = [
    "shape",
    "dtype",
    "impl",
    "loss ms",
    "loss+grad ms",
    "loss MB",
    "loss+grad MB",
    "skipped",
    "loss value",
  ]
  lines = []
  for row in rows:
    if "error" in row:
      lines.append([row["shape"], row["dtype"], row["impl"], "error: " + row["error"]] + [""] * 5)
      continue
    lines.append(
      [
        row["shape"],
        row["dtype"],
        row["impl"],
        _ms(row, "loss_ms"),
        _ms(row, "grad_ms"),
        _mb(row, "loss_memory_bytes"),
        _mb(row, "grad_memory_bytes"),
        f"{row['skipped_fraction']:.3f}" if "skipped_fraction" in row else "-",
        f"{row['loss_value']:.5f}",
      ]
    )
  if markdown:
    out = [
      "| " + " | ".join(header) + " |",
      "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|",
    ]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)
  widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
  fmt = lambda cells: "  ".join(str(x).ljust(w) for x, w in zip(cells, widths, strict=True))
  return "\n".join([fmt(header), *(fmt(line) for line in lines)])


def goals(rows: list[dict[str, Any]]) -> list[str]:
  """The issue's goals per shape: pallas_gpu vs apple's CCE and vs xla."""
  out = []
  for shape in dict.fromkeys(row["shape"] for row in rows):
    by = {r["impl"]: r for r in rows if r["shape"] == shape and "error" not in r}
    ours, xla, apple = by.get("pallas_gpu"), by.get("xla"), by.get("apple-cce")
    if ours and xla:
      met = "met" if ours["grad_ms"] < xla["grad_ms"] else "NOT met"
      out.append(
        f"{shape}: pallas_gpu loss+grad {ours['grad_ms']:.2f} ms vs xla "
        f"{xla['grad_ms']:.2f} ms ({met})"
      )
    if ours and apple:
      met_time = ours["grad_ms"] <= apple["grad_ms"] and ours["loss_ms"] <= apple["loss_ms"]
      met_memory = ours.get("grad_memory_bytes", 0) <= 1.1 * apple.get("grad_memory_bytes", 0)
      out.append(
        f"{shape}: vs apple-cce: time {'met' if met_time else 'NOT met'}, "
        f"memory within 10% {'met' if met_memory else 'NOT met'}"
      )
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--shapes",
    type=parse_shapes,
    default=parse_shapes(DEFAULT_SHAPES),
    help=f"NxDxV:dtype,... (default {DEFAULT_SHAPES})",
  )
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--apple-path", default=None, help="directory holding cut_cross_entropy (pip install --target)"
  )
  parser.add_argument(
    "--interpret",
    action="store_true",
    help="run pallas_gpu in interpret mode (a smoke test on a CPU)",
  )
  parser.add_argument("--markdown", action="store_true")
  parser.add_argument("--json", default=None, help="also write the rows to this file")
  args = parser.parse_args(argv)

  device = jax.devices()[0]
  print(
    f"jax {jax.__version__} on {device.device_kind} ({jax.default_backend()}), "
    f"python {platform.python_version()}, {datetime.date.today()}"
  )
  if jax.default_backend() != "gpu" and not args.interpret:
    print("warning: no GPU; pallas_gpu needs --interpret here", flush=True)
  apple = load_apple(args.apple_path)
  rows = []
  for shape in args.shapes:
    rows += run_shape(shape, args, apple)
  print()
  print(format_table(rows, args.markdown))
  for line in goals(rows):
    print("goal: " + line)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": device.device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
