"""Per-token ``weights=`` of ``linear_cross_entropy``: edge cases, filtering, vmap, errors.

Loss and gradients with float (zero and negative entries) and bool weights against the float64
reference, for every option and implementation, are in the option matrix (``tests/testing.py``,
option "weights"); this file covers what the matrix does not.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
from testing import SMALL_BLOCKS, assert_rel_close

import cce_jax

B, T, D, V = 2, 13, 24, 75  # ragged against the 8 x 32 tiles of SMALL_BLOCKS
IGNORE = -100


@pytest.fixture(name="inputs")
def fixture_inputs():
  rng = np.random.default_rng(1515)
  e = jnp.asarray(rng.normal(size=(B, T, D)) + 0.3, jnp.float32)
  c = jnp.asarray(rng.normal(size=(V, D)) * 0.6, jnp.float32)
  labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.25] = IGNORE
  weights = rng.uniform(-1.0, 2.0, size=(B, T)).astype(np.float32)
  return e, c, jnp.asarray(labels), jnp.asarray(weights)


def _loss(e, c, labels, weights, **kwargs):
  kwargs = {"filter_eps": None, "block_sizes": SMALL_BLOCKS, **kwargs}
  return cce_jax.linear_cross_entropy(e, c, labels, weights=weights, **kwargs)


@pytest.mark.parametrize("impl", ["xla", "reference"])
@pytest.mark.parametrize("weights", ["zeros", "cancelling"])
def test_mean_over_zero_weight_sum_is_zero_not_nan(inputs, impl, weights):
  """A weight sum of exactly 0 (all zero, or +1/-1 pairs) gives 0 and zero gradients."""
  e, c, labels, _ = inputs
  labels = jnp.full_like(labels, 5)
  w = jnp.zeros((B, T)) if weights == "zeros" else jnp.tile(jnp.array([1.0, -1.0]), (B, 7))[:, :T]
  if weights == "cancelling":
    w = w.at[:, -1].set(0.0)  # T = 13 is odd
  assert float(jnp.sum(w)) == 0.0

  def f(e, c, w):
    return _loss(e, c, labels, w, impl=impl)

  value, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(e, c, w)
  assert float(value) == 0.0
  for g in grads:
    chex.assert_tree_all_finite(g)
    assert float(jnp.max(jnp.abs(g))) == 0.0


def test_negative_weight_sum_divides_by_the_signed_sum(inputs):
  e, c, labels, _ = inputs
  w = -jnp.abs(inputs[3]) - 0.1
  unweighted = _loss(e, c, labels, None, reduction="none")
  counted = labels != IGNORE
  expected = jnp.sum(unweighted * w) / jnp.sum(jnp.where(counted, w, 0.0))
  assert_rel_close("mean", _loss(e, c, labels, w), expected, 1e-6)
  assert float(_loss(e, c, labels, w)) > 0.0  # a negative sum over a negative sum


@pytest.mark.parametrize("shift", [0, 2])
def test_weights_at_ignored_and_shifted_out_tokens_are_never_read(inputs, shift):
  """inf and NaN weights where the label is ignored (or has no position under ``shift``)."""
  e, c, labels, w = inputs
  unread = (labels == IGNORE).at[:, :shift].set(True)
  poisoned = jnp.where(unread, jnp.where(jnp.arange(T) % 2 == 0, jnp.inf, jnp.nan), w)
  clean = jnp.where(unread, 0.0, w)
  for reduction in ("mean", "sum", "none"):
    f = lambda e, w, reduction=reduction: jnp.sum(
      _loss(e, c, labels, w, reduction=reduction, shift=shift)
    )
    value, (d_e, d_w) = jax.value_and_grad(f, argnums=(0, 1))(e, poisoned)
    expected, (d_e_ref, _) = jax.value_and_grad(f, argnums=(0, 1))(e, clean)
    chex.assert_trees_all_close((value, d_e), (expected, d_e_ref), rtol=1e-6, atol=1e-7)
    chex.assert_tree_all_finite(d_w)
    assert float(jnp.max(jnp.abs(jnp.where(unread, d_w, 0.0)))) == 0.0


def test_bool_weights_are_optax_where(inputs):
  """``weights=mask`` equals dropping the masked-out tokens through ``ignore_index``."""
  e, c, labels, w = inputs
  mask = w > 0.5
  for reduction in ("mean", "sum", "none"):
    masked = _loss(e, c, labels, mask, reduction=reduction, shift=1)
    dropped = _loss(e, c, jnp.where(mask, labels, IGNORE), None, reduction=reduction, shift=1)
    chex.assert_trees_all_close(masked, dropped, rtol=1e-6)


def test_gradient_of_the_weights_is_the_per_token_loss(inputs):
  e, c, labels, w = inputs
  d_w = jax.grad(lambda w: _loss(e, c, labels, w, reduction="sum", shift=1))(w)
  per_token = _loss(e, c, labels, None, reduction="none", shift=1)
  chex.assert_trees_all_close(d_w[:, 1:], per_token, rtol=1e-6)
  assert float(jnp.max(jnp.abs(d_w[:, 0]))) == 0.0  # labels[:, 0] is never a target


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_weight_dtypes_and_their_gradients(inputs, dtype):
  e, c, labels, w = inputs
  w = w.astype(dtype)
  d_w = jax.grad(lambda w: _loss(e, c, labels, w))(w)
  chex.assert_type(d_w, dtype)
  expected = reference64.mean_reference(e, c, labels, weights=w, ignore_index=IGNORE)
  assert_rel_close("d_weights", d_w, expected["d_weights"], 2e-5 if dtype == jnp.float32 else 1e-2)


def test_traced_weights_under_jit_and_vmap(inputs):
  """Weights computed inside the traced function (RL advantages) and a vmapped batch."""
  e, c, labels, w = inputs

  def per_sequence(e, labels, w):  # (T, D), (T,), (T,)
    advantages = w - jnp.mean(w)
    return _loss(e, c, labels, advantages, reduction="sum", shift=1)

  batched = jax.jit(jax.vmap(per_sequence))(e, labels, w)
  one_by_one = jnp.stack([per_sequence(e[i], labels[i], w[i]) for i in range(B)])
  chex.assert_trees_all_close(batched, one_by_one, rtol=1e-5)
  grads = jax.jit(
    jax.grad(lambda e, w: jnp.sum(jax.vmap(per_sequence)(e, labels, w)), argnums=(0, 1))
  )(e, w)
  grads_one = [jax.grad(per_sequence, argnums=(0, 2))(e[i], labels[i], w[i]) for i in range(B)]
  chex.assert_trees_all_close(grads[0], jnp.stack([g[0] for g in grads_one]), rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(grads[1], jnp.stack([g[1] for g in grads_one]), rtol=1e-5, atol=1e-7)


def _blocks(impl: str):
  if impl == "pallas_gpu":
    from pallas_kernels.gpu import GPUBlockSizes

    return GPUBlockSizes(token_block=16, vocab_block=32, hidden_block=16)
  if impl == "pallas_tpu":
    from pallas_kernels.tpu import TPUBlockSizes

    return TPUBlockSizes(token_block=128, vocab_block=128, hidden_block=128)
  return SMALL_BLOCKS


@pytest.mark.parametrize(
  "impl",
  [
    "xla",
    "reference",
    # Slow in interpret mode (run with --runslow); the xla case checks the rule by default.
    pytest.param("pallas_gpu", marks=pytest.mark.slow),
    pytest.param("pallas_tpu", marks=pytest.mark.slow),
  ],
)
def test_filtering_scales_with_the_weight(inputs, impl):
  """The rule is |w_n| sigma_n p < eps: uniform weights 1/4 with eps skip the tiles of weight 1
  with 4 eps, and give a quarter of their filtered gradient."""
  e, c, labels, _ = inputs
  # Targets in the first vocabulary block and a low bias on the others: some tiles can go.
  labels = jnp.where(labels == IGNORE, IGNORE, labels % 32)
  bias = jnp.where(jnp.arange(V) < 32, 0.0, -3.0)
  eps = 0.03
  quarter, one = jnp.full((B, T), 0.25), jnp.ones((B, T))
  options = dict(
    bias=bias,
    block_sizes=_blocks(impl),
    sort_vocab=False,
    impl=impl,
    interpret=impl.startswith("pallas"),
  )
  stats = lambda w, eps: cce_jax.filter_stats(e, c, labels, weights=w, filter_eps=eps, **options)
  assert int(stats(quarter, eps)["skipped_tiles"]) == int(stats(one, 4 * eps)["skipped_tiles"])
  if impl in ("xla", "pallas_gpu"):
    assert int(stats(quarter, eps)["skipped_tiles"]) > int(stats(one, eps)["skipped_tiles"])
  grad = lambda w, eps: jax.grad(
    lambda e, c: _loss(e, c, labels, w, reduction="sum", filter_eps=eps, **options), argnums=(0, 1)
  )(e, c)
  filtered, exact = grad(quarter, eps), grad(quarter, None)
  chex.assert_trees_all_close(
    filtered, jax.tree.map(lambda g: 0.25 * g, grad(one, 4 * eps)), rtol=1e-5, atol=1e-7
  )
  if impl in ("xla", "pallas_gpu"):  # filtering did drop something
    assert not np.allclose(filtered[1], exact[1], rtol=1e-6, atol=1e-7)


def test_zero_weights_let_their_tiles_go(inputs):
  """Tokens of weight 0 keep only the tiles holding their target (filtering on)."""
  e, c, labels, _ = inputs
  # Whole tiles here (16 tokens, 64 classes), so that each token and class is in one tile.
  e, c = e[:, :8], c[:64]
  labels = jnp.where(labels[:, :8] == IGNORE, IGNORE, labels[:, :8] % 64)
  stats = cce_jax.filter_stats(
    e,
    c,
    labels,
    weights=jnp.zeros((B, 8)),
    filter_eps=1e-6,
    block_sizes=SMALL_BLOCKS,
    sort_vocab=False,
  )
  held = np.asarray(labels).reshape(-1)
  token_blocks, vocab_blocks = 2, 2
  with_target = {
    (n // SMALL_BLOCKS.token_block, t // SMALL_BLOCKS.vocab_block)
    for n, t in enumerate(held)
    if t != IGNORE
  }
  assert int(stats["total_tiles"]) == token_blocks * vocab_blocks
  assert int(stats["skipped_tiles"]) == token_blocks * vocab_blocks - len(with_target)


@pytest.mark.parametrize(
  ("weights", "error", "match"),
  [
    (np.ones((B, T - 1), np.float32), ValueError, r"`weights` must have the shape of `labels`"),
    (np.ones((B * T,), np.float32), ValueError, r"`weights` must have the shape"),
    (np.ones((B, T), np.int32), TypeError, r"`weights` must be a float array"),
    ([[1.0] * T] * B, TypeError, r"`weights` must be an array"),
  ],
)
def test_bad_weights_name_the_argument(inputs, weights, error, match):
  e, c, labels, _ = inputs
  weights = weights if isinstance(weights, list) else jnp.asarray(weights)
  with pytest.raises(error, match=match):
    cce_jax.linear_cross_entropy(e, c, labels, weights=weights)
  with pytest.raises(error, match=match):
    cce_jax.filter_stats(e, c, labels, weights=weights)
