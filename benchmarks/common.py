"""What the benchmark scripts share: the materialized baseline and the shape arguments."""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def baseline_loss(e: jax.Array, c: jax.Array, labels: jax.Array) -> jax.Array:
  """Masked mean over ``labels != IGNORE_INDEX`` of optax's cross-entropy on the materialized
  f32 logits: what ``cce_jax.linear_cross_entropy`` replaces."""
  logits = (e @ c.T).astype(jnp.float32)
  valid = labels != IGNORE_INDEX
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
  per_token = jnp.where(valid, per_token, 0.0)
  return jnp.sum(per_token) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


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
