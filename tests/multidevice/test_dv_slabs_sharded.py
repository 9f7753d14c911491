"""A (D, V) classifier split over the vocabulary inside the user's ``jax.shard_map`` with
``check_vma=True``, each shard a whole number of 128-column slabs, so that "xla" reads the
target columns and the sorted tiles by slabs (``cce_jax.column_slabs``): loss and gradients
against the float64 reference.

Run through tests/test_multidevice.py (which forces 8 host devices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from testing import assert_rel_close

import cce_jax
from cce_jax import column_slabs

assert jax.device_count() == 8, "run through tests/test_multidevice.py"

SLAB = column_slabs.SLAB_WIDTH
# 53 tokens (ragged), 2 vocabulary shards of 3 slabs each.
NUM_TOKENS, HIDDEN, VOCAB_SHARDS = 53, 16, 2
NUM_CLASSES = VOCAB_SHARDS * 3 * SLAB


@pytest.mark.parametrize("sort_vocab", [True, False])
def test_sharded_dv_slabs_match_the_float64_reference(sort_vocab):
  rng = np.random.default_rng(20)
  e = (rng.normal(size=(NUM_TOKENS, HIDDEN)) + 0.2).astype(np.float32)
  c_t = (rng.normal(size=(HIDDEN, NUM_CLASSES)) * 0.5).astype(np.float32)  # (D, V)
  labels = rng.integers(0, NUM_CLASSES, size=(NUM_TOKENS,)).astype(np.int32)
  blocks = cce_jax.BlockSizes(token_block=16, vocab_block=2 * SLAB)  # tiles overlap by a slab
  mesh = jax.make_mesh((VOCAB_SHARDS,), ("tensor",), axis_types=(AxisType.Auto,))

  def local_loss(e, c_t, labels):
    return cce_jax.linear_cross_entropy(
      e,
      c_t,
      labels,
      impl="xla",
      classifier_layout="dv",
      vocab_axis="tensor",
      block_sizes=blocks,
      filter_eps=None,
      sort_vocab=sort_vocab,
    )

  loss_fn = jax.shard_map(
    local_loss, mesh=mesh, in_specs=(P(), P(None, "tensor"), P()), out_specs=P(), check_vma=True
  )
  loss, (d_e, d_c_t) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
    jnp.asarray(e), jnp.asarray(c_t), jnp.asarray(labels)
  )
  expected = reference64.mean_reference(e, c_t, labels, classifier_layout="dv")
  assert_rel_close("loss", loss, expected["loss"], 2e-5)
  assert_rel_close("d_e", d_e, expected["d_e"], 2e-5)
  assert_rel_close("d_c", d_c_t, expected["d_c"], 2e-5)
