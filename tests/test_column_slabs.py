"""The (D, V) classifier read and written by slabs of columns (``cce_jax.column_slabs``), and the
"xla" loss on that path against the float64 reference (issue 20: no transposed copy of c on
TPU; the memory itself is checked by ``tests/test_layout_tpu_aot.py``)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
from testing import assert_rel_close

import cce_jax
from cce_jax import column_slabs, synthetic, xla_chunked
from cce_jax.options import LossOptions

HIDDEN = 24
SLAB = column_slabs.SLAB_WIDTH


@pytest.mark.parametrize("num_classes, num_ids", [(50, 7), (300, 70), (5 * SLAB, 33)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_column_rows_are_the_columns_of_the_ids(num_classes, num_ids, dtype):
  rng = np.random.default_rng(num_classes + num_ids)
  c = jnp.asarray(rng.normal(size=(HIDDEN, num_classes)), dtype)
  ids = rng.integers(0, num_classes, size=num_ids)
  ids[:3] = [0, num_classes - 1, num_classes - 1]  # both edges, and a repeat
  rows = column_slabs.column_rows(c, jnp.asarray(ids, jnp.int32))
  chex.assert_shape(rows, (num_ids, HIDDEN))
  chex.assert_type(rows, dtype)
  np.testing.assert_array_equal(np.asarray(rows), np.asarray(c)[:, ids].T)


def test_column_rows_never_mix_in_other_columns():
  rng = np.random.default_rng(1)
  c = rng.normal(size=(HIDDEN, 3 * SLAB)).astype(np.float32)
  ids = np.array([5, SLAB + 7, 3 * SLAB - 1])
  poisoned = np.setdiff1d(np.arange(3 * SLAB), ids)
  c[:, poisoned[::2]] = np.nan
  c[:, poisoned[1::2]] = np.inf
  rows = column_slabs.column_rows(jnp.asarray(c), jnp.asarray(ids, jnp.int32))
  np.testing.assert_array_equal(np.asarray(rows), c[:, ids].T)


def test_slab_order_orders_whole_slabs_by_their_best_score():
  rng = np.random.default_rng(2)
  score = rng.normal(size=(6 * SLAB,)).astype(np.float32)
  order = np.asarray(column_slabs.slab_order(jnp.asarray(score), SLAB))
  chex.assert_type(order, np.int32)
  np.testing.assert_array_equal(np.sort(order), np.arange(6 * SLAB))
  runs = order.reshape(-1, SLAB)
  np.testing.assert_array_equal(runs, runs[:, :1] + np.arange(SLAB))
  assert np.all(runs[:, 0] % SLAB == 0)
  best = score.reshape(-1, SLAB).max(axis=1)[runs[:, 0] // SLAB]
  assert np.all(np.diff(best) <= 0), best


def test_gather_and_write_slabs_touch_exactly_their_columns():
  rng = np.random.default_rng(3)
  num_classes = 5 * SLAB
  c = rng.normal(size=(HIDDEN, num_classes)).astype(np.float32)
  score = jnp.asarray(rng.normal(size=(num_classes,)))
  order = np.asarray(column_slabs.slab_order(score, SLAB))
  class_ids = order[SLAB : 3 * SLAB]  # a tile of two slabs
  block = column_slabs.gather_slabs(jnp.asarray(c), jnp.asarray(class_ids), SLAB)
  np.testing.assert_array_equal(np.asarray(block), c[:, class_ids])

  d_c = rng.normal(size=(HIDDEN, num_classes)).astype(np.float32)
  new = rng.normal(size=(HIDDEN, 2 * SLAB)).astype(np.float32)
  fresh = np.repeat([False, True], SLAB)  # the first slab was written by an earlier tile
  out = column_slabs.write_slabs(
    jnp.asarray(d_c), jnp.asarray(new), jnp.asarray(class_ids), jnp.asarray(fresh), SLAB
  )
  want = d_c.copy()
  want[:, class_ids[fresh]] = new[:, fresh]
  np.testing.assert_array_equal(np.asarray(out), want)


@pytest.mark.parametrize(
  "num_classes, vocab_block, width",
  [
    (256000, 2048, 128),
    (128256, 8192, 128),
    (384, 2048, 128),  # the block clamped to the vocabulary
    (128256 // 4, 2048, None),  # Llama 3's vocabulary over 4 shards: stored V-major on TPU
    (50257, 2048, None),
    (640, 100, None),
  ],
)
def test_tile_slab_width_needs_whole_lanes_in_the_vocabulary_and_block(
  num_classes, vocab_block, width
):
  assert column_slabs.tile_slab_width(num_classes, vocab_block) == width


@pytest.mark.parametrize(
  "num_classes, vocab_block, sort_vocab, access",
  [
    (5 * SLAB, 2 * SLAB, True, "slabs"),
    (5 * SLAB, 2 * SLAB, False, "slabs"),
    (5 * SLAB, 100, True, "columns"),
    (300, 2 * SLAB, True, "columns"),
    (300, 2 * SLAB, False, "window"),
  ],
)
def test_classifier_access_of_dv(num_classes, vocab_block, sort_vocab, access):
  opts = LossOptions(classifier_layout="dv", sort_vocab=sort_vocab)
  assert xla_chunked.classifier_access(num_classes, vocab_block, opts) == access
  vd = LossOptions(classifier_layout="vd", sort_vocab=sort_vocab)
  assert xla_chunked.classifier_access(num_classes, vocab_block, vd) == "rows"


def _inputs(seed: int, num_classes: int, with_bias: bool):
  rng = np.random.default_rng(seed)
  e = (rng.normal(size=(2, 37, HIDDEN)) + 0.3).astype(np.float32)  # 74 tokens: ragged
  c = (rng.normal(size=(num_classes, HIDDEN)) * 0.5 + 0.1).astype(np.float32)
  labels = rng.integers(0, num_classes, size=(2, 37)).astype(np.int32)
  labels[0, :5] = -100
  bias = rng.normal(size=(num_classes,)).astype(np.float32) if with_bias else None
  return e, c, labels, bias


@pytest.mark.parametrize(
  "num_classes, options",
  [
    (5 * SLAB, dict(softcap=4.0, with_bias=True)),
    (5 * SLAB, dict(label_smoothing=0.1, z_loss=1e-3, sort_vocab=False)),
    (3 * SLAB, dict(shift=1, with_bias=True)),
    (3 * SLAB, dict(z_loss=1e-3, with_bias=True, vocab_block=SLAB)),
    (300, dict(label_smoothing=0.2)),  # not a whole number of slabs: "columns"
  ],
)
def test_dv_matches_the_float64_reference(num_classes, options):
  options = dict(options)
  with_bias = options.pop("with_bias", False)
  sort_vocab = options.pop("sort_vocab", True)
  blocks = cce_jax.BlockSizes(token_block=16, vocab_block=options.pop("vocab_block", 2 * SLAB))
  e, c, labels, bias = _inputs(num_classes, num_classes, with_bias)
  loss_options = dict(
    ignore_index=-100, softcap=None, reduction="mean", shift=0, z_loss=0.0, label_smoothing=0.0
  )
  loss_options.update(options)
  expected = reference64.reference(e, c, labels, bias, classifier_layout="vd", **loss_options)

  def loss_fn(e, c, bias):
    return cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      bias=bias,
      impl="xla",
      classifier_layout="dv",
      filter_eps=None,
      sort_vocab=sort_vocab,
      block_sizes=blocks,
      **loss_options,
    )

  loss, (d_e, d_c_t, d_bias) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(
    jnp.asarray(e), jnp.asarray(c.T), None if bias is None else jnp.asarray(bias)
  )
  chex.assert_shape(d_c_t, (HIDDEN, num_classes))
  assert_rel_close("loss", loss, expected["loss"], 2e-5)
  assert_rel_close("d_e", d_e, expected["d_e"], 2e-5)
  assert_rel_close("d_c", np.asarray(d_c_t).T, expected["d_c"], 2e-5)
  if bias is not None:
    assert_rel_close("d_bias", d_bias, expected["d_bias"], 2e-5)


@pytest.mark.slow
def test_dv_slab_sort_filters_within_the_skipped_mass():
  """With filtering, the slab-sorted "dv" backward skips tiles and stays within the gradient
  mass it dropped (the same bound as the per-class sort of "vd").

  The class ids are numbered by frequency, as a BPE vocabulary roughly is: slabs of
  consecutive ids then hold classes of alike probability (with randomly numbered classes
  every slab holds a probable one and the slab sort finds nothing to skip: README)."""
  eps = 1e-3
  num_tokens, num_classes = 200, 8 * SLAB
  e, c, labels = synthetic.trained_like_inputs(jax.random.key(5), num_tokens, 32, num_classes)
  by_frequency = jnp.argsort(-(c @ jnp.mean(e, axis=0)))  # class ids by descending prior
  c = c[by_frequency]
  labels = jnp.argsort(by_frequency).astype(jnp.int32)[labels]
  blocks = cce_jax.BlockSizes(token_block=16, vocab_block=SLAB)
  options = dict(classifier_layout="dv", filter_eps=eps, block_sizes=blocks, impl="xla")
  stats = cce_jax.filter_stats(e, c.T, labels, **options)
  assert int(stats["skipped_tiles"]) > 0
  loss_fn = lambda e, c_t: cce_jax.linear_cross_entropy(e, c_t, labels, **options)
  loss, (d_e, d_c_t) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(e, c.T)
  exact = reference64.mean_reference(e, c, labels)
  assert float(loss) == pytest.approx(float(exact["loss"]), rel=2e-5)
  reference64.assert_filtered_within_dropped_mass(
    d_e, np.asarray(d_c_t).T, exact, reference64.small_entry_bounds(e, c, labels, 0.0, eps)
  )
