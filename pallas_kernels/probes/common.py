"""What every probe shares: the toy problem, its float64 reference, and the result record.

The toy is the core of our forward kernel: one block of ``TOKENS`` tokens against ``CLASSES``
classes, visited in tiles of ``VOCAB_BLOCK`` classes, each tile's logits ``e @ c_tile.T``
(bfloat16 operands, f32 accumulation) folded into an online log-sum-exp per token. Sizes are
the smallest a Hopper warpgroup matrix product takes (64 rows), so that every route can run
the same problem.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

TOKENS, HIDDEN, CLASSES, VOCAB_BLOCK = 64, 64, 256, 64
DTYPE = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  """One check of one route.

  Attributes:
    route: the route's name ("mosaic_gpu", "triton_pallas", "jax_triton", "xla").
    check: what was tried ("lower for CUDA (h100)", "interpret on CPU", ...).
    status: "ok", "failed" (tried, raised or gave wrong numbers) or "unavailable" (could not
      be tried here: a missing package or a JAX without the feature).
    detail: the evidence: what the lowering emitted, the error against float64, or the first
      line of the exception.
  """

  route: str
  check: str
  status: str
  detail: str


def example_shapes() -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """Abstract (e, c): (TOKENS, HIDDEN) and (CLASSES, HIDDEN), bfloat16."""
  return (
    jax.ShapeDtypeStruct((TOKENS, HIDDEN), DTYPE),
    jax.ShapeDtypeStruct((CLASSES, HIDDEN), DTYPE),
  )


def example_inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Random (e, c) of :func:`example_shapes`, bfloat16 numpy arrays (fresh normal values)."""
  rng = np.random.default_rng(seed)
  e = rng.standard_normal((TOKENS, HIDDEN)).astype(DTYPE)
  c = rng.standard_normal((CLASSES, HIDDEN)).astype(DTYPE)
  return e, c


def reference_lse(e: np.ndarray, c: np.ndarray) -> np.ndarray:
  """(TOKENS,) float64 log-sum-exp over the classes of ``e @ c.T``, computed in float64."""
  logits = np.asarray(e, np.float64) @ np.asarray(c, np.float64).T  # (TOKENS, CLASSES)
  row_max = logits.max(axis=1)
  return row_max + np.log(np.exp(logits - row_max[:, None]).sum(axis=1))


def first_line(error: BaseException) -> str:
  """``Type: first line of the message`` of ``error``, at most 160 characters."""
  lines = str(error).strip().splitlines()
  message = lines[0] if lines else ""
  return f"{type(error).__name__}: {message}"[:160]


def check_numbers(
  route: str,
  check: str,
  run: Callable[[np.ndarray, np.ndarray], jax.Array],
  tolerance: float = 1e-5,
) -> ProbeResult:
  """Runs ``run(e, c)`` on :func:`example_inputs` and compares it with :func:`reference_lse`
  (maximum relative error; bfloat16 operands are exact products in f32, so only the f32
  accumulation and exponentials differ)."""
  e, c = example_inputs()
  try:
    got = np.asarray(run(e, c), np.float64)
  except Exception as error:
    return ProbeResult(route, check, "failed", first_line(error))
  want = reference_lse(e, c)
  if got.shape != want.shape:
    return ProbeResult(route, check, "failed", f"shape {got.shape}, expected {want.shape}")
  error = float(np.max(np.abs(got - want) / np.abs(want)))
  status = "ok" if error <= tolerance else "failed"
  return ProbeResult(route, check, status, f"max relative error {error:.1e} vs float64")


def custom_calls(module_text: str) -> list[str]:
  """The custom-call targets in a lowered StableHLO module's text, in order."""
  return re.findall(r"custom_call @([\w$.]+)", module_text)
