"""``cce_jax.token_stats`` under ``mesh=`` (tokens and vocabulary split) on 8 host devices.

Run through tests/test_multidevice.py. The combined lse, entropy, argmax, logprob and correct
and the gradients must equal the float64 reference; argmax ties between vocabulary shards go
to the lowest global class id; a whole masked shard adds nothing. Also the Pallas forwards
(interpret mode) under ``mesh=``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stats64
from jax.sharding import AxisType
from testing import assert_rel_close

import cce_jax
from pallas_kernels.gpu import GPUBlockSizes
from pallas_kernels.tpu import TPUBlockSizes

assert jax.device_count() == 8, "run through tests/test_multidevice.py"

# 2 token shards of 2 x 11 tokens, V = 76 classes in 4 vocabulary shards of 19.
BATCH, SEQ_LEN, HIDDEN, NUM_CLASSES, VOCAB_SHARDS = 4, 11, 16, 76, 4
SHARD = NUM_CLASSES // VOCAB_SHARDS
BLOCKS = cce_jax.BlockSizes(token_block=8, vocab_block=8)
MODES = {
  "token+vocab": dict(token_axes="data", vocab_axis="tensor"),
  "vocab": dict(vocab_axis="tensor"),
}


def _mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((2, VOCAB_SHARDS), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)


def _inputs(seed: int, masked=None):
  rng = np.random.default_rng(seed)
  e = rng.normal(size=(BATCH, SEQ_LEN, HIDDEN)).astype(np.float32)
  c = (rng.normal(size=(NUM_CLASSES, HIDDEN)) * 0.6).astype(np.float32)
  bias = rng.normal(size=(NUM_CLASSES,)).astype(np.float32)
  allowed = np.arange(NUM_CLASSES)
  if masked is not None:
    bias[masked] = -np.inf
    allowed = np.setdiff1d(allowed, masked)
  labels = rng.choice(allowed, size=(BATCH, SEQ_LEN)).astype(np.int32)
  labels[1, 3] = -100
  return jnp.asarray(e), jnp.asarray(c), jnp.asarray(labels), jnp.asarray(bias)


@pytest.mark.parametrize("masked_shard", [False, True])
@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_sharded_stats_and_gradients_match_the_reference(layout, masked_shard):
  # Shard 2 entirely masked, and a few classes of shard 0.
  masked = np.r_[0:5, 2 * SHARD : 3 * SHARD] if masked_shard else None
  e, c, labels, bias = _inputs(3 + masked_shard + 2 * (layout == "dv"), masked)
  c = c if layout == "vd" else c.T
  options = dict(shift=1, classifier_layout=layout)
  sharding = dict(token_axes="data", vocab_axis="tensor", mesh=_mesh())
  stats = jax.jit(
    lambda e, c, bias: cce_jax.token_stats(
      e, c, labels, bias=bias, block_sizes=BLOCKS, **options, **sharding
    )
  )(e, c, bias)
  expected = stats64.stats(e, c, labels, bias, **options)
  assert_rel_close("lse", stats.lse, expected["lse"], 2e-5)
  assert_rel_close("entropy", stats.entropy, expected["entropy"], 1e-4)
  assert_rel_close("logprob", stats.logprob, expected["logprob"], 2e-5)
  z64 = expected["z"]
  chex.assert_trees_all_equal(np.asarray(stats.argmax), z64.argmax(-1).astype(np.int32))
  counted = np.asarray(labels)[:, 1:] != -100
  chex.assert_trees_all_equal(
    np.asarray(stats.correct), counted & (z64.argmax(-1) == np.asarray(labels)[:, 1:])
  )

  rng = np.random.default_rng(11)
  weights = {k: rng.normal(size=(BATCH, SEQ_LEN - 1)) for k in ("lse", "entropy", "logprob")}

  def objective(e, c, bias):
    out = cce_jax.token_stats(e, c, labels, bias=bias, block_sizes=BLOCKS, **options, **sharding)
    return sum(jnp.sum(weights[k] * getattr(out, k)) for k in weights)

  grads = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(e, c, bias)
  expected_grads = stats64.stats_grads(e, c, labels, bias, weights, ignore_index=-100, **options)
  for name, grad in zip(("d_e", "d_c", "d_bias"), grads, strict=True):
    assert_rel_close(name, grad, expected_grads[name], 1e-4)
  if masked is not None:
    chex.assert_trees_all_equal(np.asarray(grads[2])[masked], np.zeros((masked.size,)))


@pytest.mark.parametrize("mode", list(MODES))
def test_argmax_ties_across_shards_go_to_the_lowest_global_id(mode):
  """Classes 5 (shard 0), 30 (shard 1) and 70 (shard 3) share a row of c: every shard but
  one holds the global maximum, and the lowest global id wins."""
  rng = np.random.default_rng(13)
  e = rng.normal(size=(BATCH, SEQ_LEN, HIDDEN)).astype(np.float32) * 0.1
  c = (rng.normal(size=(NUM_CLASSES, HIDDEN)) * 0.1).astype(np.float32)
  direction = rng.normal(size=HIDDEN).astype(np.float32)
  c[[5, 30, 70]] = 3.0 * direction
  e[:2] += direction
  # The other sequences: classes 40 (shard 2) and 60 (shard 3) tie.
  other = rng.normal(size=HIDDEN).astype(np.float32)
  c[[40, 60]] = 3.0 * other
  e[2:] += other
  stats = cce_jax.token_stats(
    jnp.asarray(e), jnp.asarray(c), block_sizes=BLOCKS, mesh=_mesh(), **MODES[mode]
  )
  expected = np.repeat(np.array([5, 5, 40, 40], np.int32)[:, None], SEQ_LEN, axis=1)
  chex.assert_trees_all_equal(np.asarray(stats.argmax), expected)


def test_inside_shard_map_with_vocab_axis():
  """Inside the user's shard_map: c is the local slice, labels global ids."""
  from jax.sharding import PartitionSpec as P

  e, c, labels, bias = _inputs(17)
  mesh = jax.make_mesh((2, VOCAB_SHARDS), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)

  def body(e, c, labels, bias):
    out = cce_jax.token_stats(e, c, labels, bias=bias, vocab_axis="tensor", block_sizes=BLOCKS)
    return tuple(out)

  sharded = jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(P("data"), P("tensor"), P("data"), P("tensor")),
    out_specs=P("data"),
  )
  lse, entropy, argmax, logprob, correct = jax.jit(sharded)(e, c, labels, bias)
  plain = cce_jax.token_stats(e, c, labels, bias=bias, block_sizes=BLOCKS)
  chex.assert_trees_all_close(
    (lse, entropy, logprob), (plain.lse, plain.entropy, plain.logprob), rtol=1e-5, atol=1e-5
  )
  chex.assert_trees_all_equal((argmax, correct), (plain.argmax, plain.correct))


# "pallas_tpu" first: its interpreter's cross-device barrier (io_callbacks that run JAX ops)
# has been seen to deadlock on 8 host devices when run after the "pallas_gpu" case in the same
# process, and to pass run first (JAX 0.10.2).
PALLAS_BLOCKS = {
  "pallas_tpu": TPUBlockSizes(token_block=128, vocab_block=128, hidden_block=128),
  # 19 classes per shard: one class block of 16 and an overlapping one.
  "pallas_gpu": GPUBlockSizes(token_block=16, vocab_block=16, hidden_block=16),
}


@pytest.mark.parametrize(  # 13 s and 3 s
  "impl", [pytest.param("pallas_tpu", marks=pytest.mark.slow), "pallas_gpu"]
)
def test_pallas_forwards_under_a_mesh(impl):
  """The Pallas forwards (interpret mode) per shard, combined over the vocabulary axis, with a
  whole masked shard; the gradients through the "xla" tiled backward."""
  masked = np.r_[2 * SHARD : 3 * SHARD, 7]
  e, c, labels, bias = _inputs(23, masked)
  options = dict(shift=1, impl=impl, interpret=True, block_sizes=PALLAS_BLOCKS[impl])
  sharding = dict(token_axes="data", vocab_axis="tensor", mesh=_mesh())
  rng = np.random.default_rng(29)
  weights = {k: rng.normal(size=(BATCH, SEQ_LEN - 1)) for k in ("lse", "entropy", "logprob")}

  def objective(e, c, bias):
    out = cce_jax.token_stats(e, c, labels, bias=bias, **options, **sharding)
    return sum(jnp.sum(weights[k] * getattr(out, k)) for k in weights), out

  grads, stats = jax.jit(jax.grad(objective, argnums=(0, 1, 2), has_aux=True))(e, c, bias)
  expected = stats64.stats(e, c, labels, bias, shift=1)
  assert_rel_close("lse", stats.lse, expected["lse"], 2e-5)
  assert_rel_close("entropy", stats.entropy, expected["entropy"], 1e-4)
  assert_rel_close("logprob", stats.logprob, expected["logprob"], 2e-5)
  chex.assert_trees_all_equal(np.asarray(stats.argmax), expected["z"].argmax(-1).astype(np.int32))
  expected_grads = stats64.stats_grads(e, c, labels, bias, weights, ignore_index=-100, shift=1)
  for name, grad in zip(("d_e", "d_c", "d_bias"), grads, strict=True):
    assert_rel_close(name, grad, expected_grads[name], 1e-4)
  chex.assert_trees_all_equal(np.asarray(grads[2])[masked], np.zeros((masked.size,)))
