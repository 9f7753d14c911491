"""Masked classes: a ``-inf`` bias over whole vocabulary blocks gives the materialized answer.

The online log-sum-exp used to start at ``-inf`` and compute ``exp(-inf - -inf) = NaN`` on a
tile whose classes are all masked. Every implementation (Pallas ones in interpret mode), with
and without the vocabulary sort, with and without softcap, must now match the float64
reference, with exactly zero gradient for the masked classes. (Whole masked vocabulary shards
under ``mesh=`` are tested in ``tests/multidevice/test_masked_shard.py``.)
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
from testing import assert_rel_close

import cce_jax

# 2 x 19 tokens, V = 300 classes: ragged for every block size below.
BATCH, SEQ_LEN, HIDDEN, NUM_CLASSES = 2, 19, 16, 300
# Classes [0, 150) are masked (whole blocks at the start of the unsorted order) and a few
# scattered ones; labels are drawn from the other classes.
MASKED = np.r_[0:150, 203, 257, 299]


def _block_sizes(impl: str):
  if impl == "pallas_gpu":
    from pallas_kernels.gpu import GPUBlockSizes

    return GPUBlockSizes(token_block=16, vocab_block=32, hidden_block=16, vocab_splits=4)
  if impl == "pallas_tpu":
    from pallas_kernels.tpu import TPUBlockSizes

    return TPUBlockSizes(token_block=128, vocab_block=128, hidden_block=128)
  return cce_jax.BlockSizes(token_block=16, vocab_block=32)


def _inputs(seed: int):
  rng = np.random.default_rng(seed)
  e = rng.normal(size=(BATCH, SEQ_LEN, HIDDEN)).astype(np.float32)
  c = (rng.normal(size=(NUM_CLASSES, HIDDEN)) * 0.6).astype(np.float32)
  bias = rng.normal(size=(NUM_CLASSES,)).astype(np.float32)
  bias[MASKED] = -np.inf
  allowed = np.setdiff1d(np.arange(NUM_CLASSES), MASKED)
  labels = rng.choice(allowed, size=(BATCH, SEQ_LEN)).astype(np.int32)
  labels[0, 3] = -100
  return jnp.asarray(e), jnp.asarray(c), jnp.asarray(labels), jnp.asarray(bias)


def _cases():
  """Every implementation, sort on and off, softcap off and on (Pallas with softcap: slow)."""
  for impl in ("xla", "reference", "pallas_gpu", "pallas_tpu"):
    for sort_vocab in (True, False):
      for softcap in (None, 20.0):
        slow = impl.startswith("pallas") and softcap is not None
        yield pytest.param(impl, sort_vocab, softcap, marks=pytest.mark.slow if slow else ())


@pytest.mark.parametrize(("impl", "sort_vocab", "softcap"), list(_cases()))
def test_masked_classes_match_the_materialized_loss(impl, sort_vocab, softcap):
  e, c, labels, bias = _inputs(seed=len(impl) + 2 * sort_vocab + (softcap is not None))
  options = dict(softcap=softcap, reduction="sum", shift=1, ignore_index=-100)
  expected = reference64.reference(
    e, c, labels, bias, z_loss=0.0, label_smoothing=0.0, classifier_layout="vd", **options
  )
  assert np.isfinite(expected["loss"])

  def loss_fn(e, c, bias):
    return cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      bias=bias,
      impl=impl,
      interpret=impl.startswith("pallas"),
      block_sizes=_block_sizes(impl),
      sort_vocab=sort_vocab,
      filter_eps=None,
      **options,
    )

  # The plain call (no sort: the masked blocks come first) and the differentiated one.
  plain = jax.jit(loss_fn)(e, c, bias)
  value, (d_e, d_c, d_bias) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(e, c, bias)
  assert_rel_close("plain loss", plain, expected["loss"], 2e-5)
  assert_rel_close("loss", value, expected["loss"], 2e-5)
  assert_rel_close("d_e", d_e, expected["d_e"], 2e-5)
  assert_rel_close("d_c", d_c, expected["d_c"], 2e-5)
  assert_rel_close("d_bias", d_bias, expected["d_bias"], 2e-5)
  chex.assert_trees_all_equal(d_c[MASKED], jnp.zeros((MASKED.size, HIDDEN)))
  chex.assert_trees_all_equal(d_bias[MASKED], jnp.zeros((MASKED.size,)))


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_masked_classes_with_filtering_and_lse(impl):
  """Default filtering and ``return_lse``: the lse and its gradient stay finite and right."""
  e, c, labels, bias = _inputs(seed=7)
  options = dict(reduction="mean", shift=0, ignore_index=-100)
  lse_weights = np.random.default_rng(8).normal(size=labels.shape)
  expected = reference64.reference(
    e,
    c,
    labels,
    bias,
    lse_weights=lse_weights,
    softcap=None,
    z_loss=0.0,
    label_smoothing=0.0,
    classifier_layout="vd",
    **options,
  )

  def objective(e, c, bias):
    loss, lse = cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      bias=bias,
      impl=impl,
      interpret=impl == "pallas_gpu",
      block_sizes=_block_sizes(impl),
      sort_vocab=False,
      return_lse=True,
      **options,
    )
    return loss + jnp.sum(lse * jnp.asarray(lse_weights, jnp.float32)), lse

  (_, lse), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))(
    e, c, bias
  )
  assert_rel_close("lse", lse, expected["lse"], 2e-5)
  for name, g in zip(("d_e", "d_c", "d_bias"), grads, strict=True):
    assert_rel_close(name, g, expected[name], 1e-4)
