"""A whole vocabulary shard of masked classes (``-inf`` bias) under ``mesh=``, and
``check_labels`` with ``mesh=`` and ``vocab_axis``.

Run through tests/test_multidevice.py (which forces 8 host devices). The masked shard's local
lse is ``-inf``; the combined loss and every gradient must equal the float64 reference, with
exactly zero gradient for the masked classes.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
from jax.sharding import AxisType
from testing import assert_rel_close

import cce_jax

assert jax.device_count() == 8, "run through tests/test_multidevice.py"

# 2 token shards of 2 x 11 tokens, V = 76 classes in 4 vocabulary shards of 19.
BATCH, SEQ_LEN, HIDDEN, NUM_CLASSES, VOCAB_SHARDS = 4, 11, 16, 76, 4
SHARD = NUM_CLASSES // VOCAB_SHARDS
# Shard 1 entirely, and the first 7 classes of shard 0 (a whole 4-class tile of "xla").
MASKED = np.r_[0:7, SHARD : 2 * SHARD]
SHARDING = dict(token_axes="data", vocab_axis="tensor")


def _mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((2, VOCAB_SHARDS), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)


def _block_sizes(impl: str):
  if impl == "pallas_gpu":
    from pallas_kernels.gpu import GPUBlockSizes

    return GPUBlockSizes(token_block=16, vocab_block=16, hidden_block=16, vocab_splits=2)
  if impl == "pallas_tpu":
    from pallas_kernels.tpu import TPUBlockSizes

    return TPUBlockSizes(token_block=128, vocab_block=128, hidden_block=128)
  return cce_jax.BlockSizes(token_block=8, vocab_block=4)


def _inputs(seed: int):
  rng = np.random.default_rng(seed)
  e = rng.normal(size=(BATCH, SEQ_LEN, HIDDEN)).astype(np.float32)
  c = (rng.normal(size=(NUM_CLASSES, HIDDEN)) * 0.6).astype(np.float32)
  bias = rng.normal(size=(NUM_CLASSES,)).astype(np.float32)
  bias[MASKED] = -np.inf
  labels = rng.choice(np.setdiff1d(np.arange(NUM_CLASSES), MASKED), size=(BATCH, SEQ_LEN))
  return jnp.asarray(e), jnp.asarray(c), jnp.asarray(labels.astype(np.int32)), jnp.asarray(bias)


@pytest.mark.parametrize(
  ("impl", "sort_vocab"),
  [
    ("xla", True),
    ("xla", False),
    ("reference", False),
    ("pallas_gpu", False),
    ("pallas_tpu", False),
  ],
)
def test_masked_vocabulary_shard_matches_the_reference(impl, sort_vocab):
  e, c, labels, bias = _inputs(seed=len(impl) + sort_vocab)
  expected = reference64.mean_reference(e, c, labels, bias, shift=1)

  def loss_fn(e, c, bias):
    return cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      bias=bias,
      shift=1,
      impl=impl,
      interpret=impl.startswith("pallas"),
      block_sizes=_block_sizes(impl),
      sort_vocab=sort_vocab,
      filter_eps=None,
      mesh=_mesh(),
      **SHARDING,
    )

  plain = jax.jit(loss_fn)(e, c, bias)
  value, (d_e, d_c, d_bias) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(e, c, bias)
  assert_rel_close("plain loss", plain, expected["loss"], 2e-5)
  assert_rel_close("loss", value, expected["loss"], 2e-5)
  for name, g in (("d_e", d_e), ("d_c", d_c), ("d_bias", d_bias)):
    assert_rel_close(name, g, expected[name], 2e-5)
  chex.assert_trees_all_equal(np.asarray(d_c)[MASKED], np.zeros((MASKED.size, HIDDEN)))
  chex.assert_trees_all_equal(np.asarray(d_bias)[MASKED], np.zeros((MASKED.size,)))


@pytest.mark.parametrize("bad_label", [NUM_CLASSES, 2 * NUM_CLASSES - 1])
def test_check_labels_with_mesh_uses_the_global_vocabulary(bad_label):
  """With mesh=, c is the global array: labels in [V, 2V) are out of range, and the message
  states [0, V)."""
  e, c, labels, _ = _inputs(seed=3)
  labels = labels.at[2, 5].set(bad_label)
  match = (
    rf"outside \[0, V\) = \[0, {NUM_CLASSES}\) .* the first is {bad_label} at index "
    r"\(2, 5\)"
  )
  with pytest.raises(ValueError, match=match):
    cce_jax.linear_cross_entropy(e, c, labels, check_labels=True, mesh=_mesh(), **SHARDING)
  # The largest valid class passes, and unchecked the bad label gives NaN.
  good = labels.at[2, 5].set(NUM_CLASSES - 1)
  loss = cce_jax.linear_cross_entropy(e, c, good, check_labels=True, mesh=_mesh(), **SHARDING)
  assert np.isfinite(loss)
  assert np.isnan(cce_jax.linear_cross_entropy(e, c, labels, mesh=_mesh(), **SHARDING))
