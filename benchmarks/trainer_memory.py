"""Trainer memory: CCE vs materialized logits in the Gemma-2-2B-like train step.

Compiles the train step of ``configs/gemma2_2b.yaml`` (V=256000, D=2304, 26 layers, per-layer
remat, bf16 compute, f32 parameters and AdamW state) for one device, with abstract inputs
(``jax.ShapeDtypeStruct``; nothing is allocated or executed), once with ``loss_impl=cce`` and
once with ``loss_impl=naive`` (f32 logits through optax), and reads ``memory_analysis()``:

* temp: the step's temporary bytes (activations, gradients, the loss's scratch);
* peak: arguments + outputs - donated (aliased) buffers + temp, i.e. the device footprint.

With ``--grad-in-forward`` a third variant, ``cce-gif`` (``loss_impl=cce`` with
``loss.grad_in_forward=true``: the loss's gradient computed in its forward, three matrix
passes instead of four), is measured alike: what that option costs in largest batch.

For each loss it then searches the largest global batch (sequences per step, no gradient
accumulation) whose peak fits an 80 GiB device: doubling, then bisection. Both are measured at
the config's sequence length (8192) and at 2048. The config runs attention in checkpointed
query chunks (``model.attention_chunk``): XLA:CPU's attention materializes the scores, and
whole (T, T) scores would otherwise be the largest per-sequence term at T=8192.
1 GiB = 2**30 bytes.

  python benchmarks/trainer_memory.py                    # both sequence lengths, a table
  python benchmarks/trainer_memory.py --seq-lens 2048    # one
  python benchmarks/trainer_memory.py --markdown         # the table for benchmarks/RESULTS.md
  python benchmarks/trainer_memory.py --seq-lens 8192 --grad-in-forward  # adds cce-gif

The exit status is 1 when CCE's largest batch is below 4x naive's at any length measured.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

from train import config
from train.aot import compile_train_step

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "gemma2_2b.yaml"
DEVICE_BYTES = 80 * 2**30
GOAL_RATIO = 4
GIB = 2**30
SINGLE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "grad_accum_steps=1"]


# Variant -> its config overrides.
VARIANTS = {
  "naive": ["loss_impl=naive"],
  "cce": ["loss_impl=cce"],
  "cce-gif": ["loss_impl=cce", "loss.grad_in_forward=true"],
}


def measure(loss_impl: str, seq_len: int, batch: int) -> dict[str, float]:
  """Compiled memory (bytes) of one train step of ``batch`` x ``seq_len`` tokens;
  ``loss_impl`` names one of ``VARIANTS``."""
  cfg = config.load(CONFIG, [*SINGLE_DEVICE, *VARIANTS[loss_impl], f"seq_len={seq_len}"])
  step = compile_train_step(cfg, batch_size=batch)
  return {"temp": step.temp_bytes, "peak": step.peak_bytes, "arguments": step.argument_bytes}


def largest_batch(loss_impl: str, seq_len: int, cache: dict) -> int:
  """The largest batch whose peak fits DEVICE_BYTES (0 if not even 1 does)."""

  def fits(batch: int) -> bool:
    if (loss_impl, seq_len, batch) not in cache:
      cache[loss_impl, seq_len, batch] = measure(loss_impl, seq_len, batch)
    return cache[loss_impl, seq_len, batch]["peak"] <= DEVICE_BYTES

  if not fits(1):
    return 0
  low, high = 1, 2
  while fits(high):
    low, high = high, high * 2
  while high - low > 1:  # fits(low), not fits(high)
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  return low


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 2048])
  parser.add_argument("--markdown", action="store_true", help="print a markdown table")
  parser.add_argument("--json", type=pathlib.Path, help="also write every number as JSON")
  parser.add_argument(
    "--grad-in-forward",
    action="store_true",
    help="also measure cce with loss.grad_in_forward=true (cce-gif)",
  )
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before the first JAX call

  rows, cache, passed = [], {}, True
  for seq_len in args.seq_lens:
    start = time.perf_counter()
    best = {impl: largest_batch(impl, seq_len, cache) for impl in ("naive", "cce")}
    same = max(best["naive"], 1)  # compare temp at the largest batch naive fits
    temp = {impl: measure(impl, seq_len, same)["temp"] for impl in ("naive", "cce")}
    ratio = best["cce"] / max(best["naive"], 1)
    passed &= ratio >= GOAL_RATIO
    if args.grad_in_forward:
      gif_best = largest_batch("cce-gif", seq_len, cache)
      gif = {
        "largest_cce_gif": gif_best,
        "temp_cce_gif": measure("cce-gif", seq_len, same)["temp"],
        "peak_cce_gif": cache["cce-gif", seq_len, max(gif_best, 1)]["peak"],
      }
      print(
        f"seq_len {seq_len}: largest batch cce-gif {gif_best} (cce {best['cce']}); temp at "
        f"batch {same}: cce-gif {gif['temp_cce_gif'] / GIB:.2f} GiB, cce "
        f"{temp['cce'] / GIB:.2f} GiB",
        file=sys.stderr,
        flush=True,
      )
    rows.append(
      {
        "seq_len": seq_len,
        "same_batch": same,
        "temp_naive": temp["naive"],
        "temp_cce": temp["cce"],
        "largest_naive": best["naive"],
        "largest_cce": best["cce"],
        "ratio": ratio,
        "peak_naive": cache["naive", seq_len, max(best["naive"], 1)]["peak"],
        "peak_cce": cache["cce", seq_len, max(best["cce"], 1)]["peak"],
        "seconds": time.perf_counter() - start,
        **(gif if args.grad_in_forward else {}),
      }
    )
    print(
      f"seq_len {seq_len}: largest batch naive {best['naive']}, cce {best['cce']} "
      f"({ratio:.1f}x); {time.perf_counter() - start:.0f} s",
      file=sys.stderr,
      flush=True,
    )

  header = (
    "| seq_len | batch | temp naive | temp cce | largest batch naive (peak) "
    "| largest batch cce (peak) | cce / naive |"
  )
  print(header)
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(
      f"| {r['seq_len']} | {r['same_batch']} | {r['temp_naive'] / GIB:.2f} GiB "
      f"| {r['temp_cce'] / GIB:.2f} GiB | {r['largest_naive']} "
      f"({r['peak_naive'] / GIB:.1f} GiB) | **{r['largest_cce']}** "
      f"({r['peak_cce'] / GIB:.1f} GiB) | **{r['ratio']:.1f}x** |"
    )
  if args.grad_in_forward:
    print(
      "\n| seq_len | largest batch cce (peak) | largest batch cce-gif (peak) | temp cce | "
      "temp cce-gif (same batch) |"
    )
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
      print(
        f"| {r['seq_len']} | {r['largest_cce']} ({r['peak_cce'] / GIB:.1f} GiB) "
        f"| {r['largest_cce_gif']} ({r['peak_cce_gif'] / GIB:.1f} GiB) "
        f"| {r['temp_cce'] / GIB:.2f} GiB | {r['temp_cce_gif'] / GIB:.2f} GiB |"
      )
  if not args.markdown:
    for r in rows:
      verdict = "PASS" if r["ratio"] >= GOAL_RATIO else "FAIL"
      print(f"goal at T={r['seq_len']}: largest batch cce >= {GOAL_RATIO}x naive: {verdict}")
  if args.json:
    args.json.write_text(json.dumps({"rows": rows, "device_bytes": DEVICE_BYTES}, indent=2))
  return 0 if passed else 1


if __name__ == "__main__":
  sys.exit(main())
