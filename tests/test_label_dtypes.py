"""Labels of every integer dtype JAX accepts: in-range values give the int32 result, values
outside [0, V) (never wrapped into range or onto ``ignore_index``) give NaN or the
``check_labels`` error naming their true value; also under x64 and as NumPy arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cce_jax

NUM_TOKENS, HIDDEN, NUM_CLASSES = 13, 8, 7  # V = 7 fits even int4 labels
BLOCKS = cce_jax.BlockSizes(token_block=4, vocab_block=3)
NARROW = ("int4", "uint4", "int8", "uint8", "int16", "uint16", "int32", "uint32")
WIDE = ("int64", "uint64")  # real 64-bit arrays only under x64 (or as NumPy arrays)


def _bad_values(dtype) -> list[int]:
  """Values outside [0, V) that ``dtype`` holds: its max, its min when negative, and the values
  that a cast to int32 would wrap onto ignore_index (-100) or onto a valid class (3)."""
  info = jnp.iinfo(dtype)
  values = [int(info.max)] + ([int(info.min)] if info.min < 0 else [])
  values += [v for v in (2**32 - 100, 2**32 + 3, 2**64 - 100) if v <= info.max]
  return values


def _inputs(dtype, seed: int):
  rng = np.random.default_rng(seed)
  e = jnp.asarray(rng.normal(size=(NUM_TOKENS, HIDDEN)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(NUM_CLASSES, HIDDEN)), jnp.float32)
  good = rng.integers(0, NUM_CLASSES, size=NUM_TOKENS)
  bad_values = _bad_values(dtype)
  bad_positions = rng.choice(NUM_TOKENS, size=len(bad_values), replace=False)
  return e, c, good, bad_positions, bad_values


def _check(dtype, labels_of, seed: int, jit: bool = True):
  e, c, good, bad_positions, bad_values = _inputs(dtype, seed)
  labels = good.astype(np.dtype(dtype))
  labels[bad_positions] = np.array(bad_values, dtype=np.dtype(dtype))
  labels = labels_of(labels)
  assert labels.dtype == np.dtype(dtype)

  def per_token(labels):
    return cce_jax.linear_cross_entropy(e, c, labels, reduction="none", block_sizes=BLOCKS)

  expected = per_token(jnp.asarray(good, jnp.int32))
  for actual in (per_token(labels), *([jax.jit(per_token)(labels)] if jit else [])):
    is_bad = np.zeros(NUM_TOKENS, bool)
    is_bad[bad_positions] = True
    assert np.all(np.isnan(actual[is_bad])), (dtype, actual)
    np.testing.assert_allclose(actual[~is_bad], expected[~is_bad], rtol=1e-6)
  first = bad_values[int(np.argmin(bad_positions))]
  with pytest.raises(ValueError, match=rf"the first is {first} at index \({min(bad_positions)},\)"):
    cce_jax.linear_cross_entropy(e, c, labels, check_labels=True)


@pytest.mark.parametrize("dtype", NARROW)
def test_label_dtypes(dtype):
  _check(jnp.dtype(dtype), jnp.asarray, seed=len(dtype))


@pytest.mark.parametrize("dtype", NARROW + WIDE)
def test_label_dtypes_under_x64(dtype):
  with jax.enable_x64(True):
    _check(jnp.dtype(dtype), jnp.asarray, seed=len(dtype) + 1)


@pytest.mark.parametrize("dtype", ("uint32", "int64", "uint64"))
def test_numpy_labels_wider_than_int32(dtype):
  """NumPy arrays keep their dtype without x64: mapped in NumPy before anything wraps them.
  (Not under jax.jit: its argument conversion to 32 bits happens before the loss sees them.)"""
  _check(np.dtype(dtype), lambda labels: labels, seed=len(dtype) + 2, jit=False)
