"""What the benchmark scripts share: the losses they compare (the materialized baseline,
``cce_jax``, ``jax-cce``), timing, compiled memory, error rows and the shape arguments."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import cce_jax

IGNORE_INDEX = -100
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}

# (e (N, D), c (V, D), labels (N,)) -> the scalar loss.
LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def baseline_loss(e: jax.Array, c: jax.Array, labels: jax.Array) -> jax.Array:
  """Masked mean over ``labels != IGNORE_INDEX`` of optax's cross-entropy on the materialized
  f32 logits: what ``cce_jax.linear_cross_entropy`` replaces."""
  logits = (e @ c.T).astype(jnp.float32)
  valid = labels != IGNORE_INDEX
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
  per_token = jnp.where(valid, per_token, 0.0)
  return jnp.sum(per_token) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


def cce_loss(impl: str, **options: Any) -> LossFn:
  """``cce_jax.linear_cross_entropy`` with ``impl``, ``ignore_index=IGNORE_INDEX`` and
  ``options`` over the defaults."""

  def loss(e: jax.Array, c: jax.Array, labels: jax.Array) -> jax.Array:
    return cce_jax.linear_cross_entropy(
      e, c, labels, impl=impl, ignore_index=IGNORE_INDEX, **options
    )

  return loss


def token_weights(labels: jax.Array) -> jax.Array:
  """Per-token weights derived from ``labels`` inside the traced step, as RL advantages or a
  loss mask would be: f32 of ``labels.shape``, in [-0.5, 1.5), about one in ten exactly 0."""
  mixed = (labels.astype(jnp.uint32) * jnp.uint32(2654435761)) >> 16  # wraps; a cheap hash
  u = (mixed % 1000).astype(jnp.float32) / 1000.0
  return jnp.where(u < 0.1, 0.0, 2.0 * u - 0.5)


def weighted_cce_loss(impl: str, **options: Any) -> LossFn:
  """:func:`cce_loss` with ``weights=token_weights(labels)`` (the weighted mean)."""

  def loss(e: jax.Array, c: jax.Array, labels: jax.Array) -> jax.Array:
    return cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      weights=token_weights(labels),
      impl=impl,
      ignore_index=IGNORE_INDEX,
      **options,
    )

  return loss


# Weight of the entropy bonus in stats_objective (an RL-style objective).
ENTROPY_BONUS = 0.01


def stats_objective(impl: str, **options: Any) -> LossFn:
  """An RL-style objective through ``cce_jax.token_stats`` with ``impl``: the masked mean of
  ``-logprob`` minus ``ENTROPY_BONUS`` times the mean entropy. Every field is kept live (a
  NaN unless every lse is finite, every argmax >= 0 and ``correct`` only at counted tokens,
  never the case here), so that the compiled program computes all five, as an evaluation
  would."""

  def objective(e: jax.Array, c: jax.Array, labels: jax.Array) -> jax.Array:
    stats = cce_jax.token_stats(e, c, labels, impl=impl, ignore_index=IGNORE_INDEX, **options)
    counted = labels != IGNORE_INDEX
    count = jnp.maximum(jnp.sum(counted), 1).astype(jnp.float32)
    value = -jnp.sum(jnp.where(counted, stats.logprob, 0.0)) / count
    value = value - ENTROPY_BONUS * jnp.mean(stats.entropy)
    live = jnp.all(jnp.isfinite(stats.lse) & (stats.argmax >= 0) & (stats.correct <= counted))
    return jnp.where(live, value, jnp.nan)

  return objective


def products_floor(e: jax.Array, c: jax.Array, labels: jax.Array) -> jax.Array:
  """Half the mean square of the materialized f32 logits: not a loss, a floor. Its loss+grad
  is the three (N, V)-sized f32 products an exact cross-entropy gradient needs too (the
  logits, dE = dZ @ C, dC = dZ.T @ E), run whole, with the cheapest elementwise work between
  them: an exact loss+grad that skips no work can beat it only by running the same products
  faster in tiles, never by much."""
  del labels
  logits = jnp.dot(e.astype(jnp.float32), c.astype(jnp.float32).T)
  return 0.5 * jnp.mean(jnp.square(logits))


def jax_cce_loss(e: jax.Array, c: jax.Array, labels: jax.Array) -> jax.Array:
  """The ``jax-cce`` package with its defaults (it has no ignore_index: a mean over all
  tokens). Imported on first use: only ``memory.py`` and ``speed.py`` need it."""
  import jax_cce

  return jax_cce.linear_cross_entropy(e, c, labels)


def timed(fn: Callable[..., Any], args: tuple) -> tuple[float, Any]:
  """(seconds, output) of one call of ``fn(*args)``, waiting for the device to finish."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def temp_bytes(fn: Callable[..., Any], *args: Any) -> int:
  """Temporary bytes of ``jax.jit(fn)`` compiled for ``args`` (arrays or shape structs; the
  function is compiled, never run).

  Raises:
    RuntimeError: the backend reports no memory analysis.
  """
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  if stats is None:
    raise RuntimeError(f"backend {jax.default_backend()!r} reports no memory analysis")
  return int(stats.temp_size_in_bytes)


def error_text(err: BaseException, limit: int = 300) -> str:
  """The one line a benchmark row records for a failed implementation: ``Type: message``,
  its first line, at most ``limit`` characters."""
  return f"{type(err).__name__}: {err}".splitlines()[0][:limit]


@dataclasses.dataclass(frozen=True)
class Shape:
  """One benchmark problem size: N tokens, hidden size D, V classes, and the input dtype."""

  n: int
  d: int
  v: int
  dtype: str

  @property
  def label(self) -> str:
    return f"{self.n}x{self.d}x{self.v}"


def parse_shapes(text: str, default_dtype: str = "f32") -> list[Shape]:
  """Parses ``"NxDxV:dtype,..."`` (dtype one of ``DTYPES``; ``default_dtype`` when omitted).

  Raises:
    argparse.ArgumentTypeError: a malformed item, an unknown dtype, or no shape at all.
  """
  shapes = []
  for item in filter(None, (part.strip() for part in text.split(","))):
    dims, _, dtype = item.partition(":")
    dtype = dtype or default_dtype
    if dtype not in DTYPES:
      raise argparse.ArgumentTypeError(f"unknown dtype {dtype!r} in {item!r}: use {list(DTYPES)}")
    try:
      n, d, v = (int(x) for x in dims.lower().split("x"))
    except ValueError as err:
      raise argparse.ArgumentTypeError(f"bad shape {item!r}: expected NxDxV[:dtype]") from err
    if min(n, d, v) <= 0:
      raise argparse.ArgumentTypeError(f"bad shape {item!r}: sizes must be positive")
    shapes.append(Shape(n, d, v, dtype))
  if not shapes:
    raise argparse.ArgumentTypeError("no shape given")
  return shapes
