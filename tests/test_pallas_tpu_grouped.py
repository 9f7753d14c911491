"""``impl="pallas_tpu"``'s grouped vocabulary sort, in TPU interpret mode on CPU.

The kernels read ``c`` in the sorted order by DMA, one group of ``kernels.GROUP_ROWS`` rows at a
time, and write dC back to the same rows (``TPUBlockSizes.vocab_sort_group``, default 16); the
forward may run a smaller vocabulary block than the backward (``Tiles.forward_vocab_block``),
its block maxima merged into the backward's blocks. Checked against the float64 reference at
sizes that are not multiples of any block (the last vocabulary block holds part of a group's
worth of positions), and against the per-class sort on a copy of ``c``.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
from testing import TOLERANCE, assert_rel_close, skipped_softmax_grad

import cce_jax
from cce_jax import column_slabs, synthetic
from cce_jax.options import LossOptions
from cce_jax.tiled import TiledInputs
from pallas_kernels.tpu import TPUBlockSizes, implementation, kernels
from pallas_kernels.tpu.block_sizes import VOCAB_SORT_GROUPS, resolve

# N = 300 tokens (3 blocks of 128, ragged), V = 400 classes = 25 groups of 16 (3 vocabulary
# blocks of 128 and one of 16 classes: one group).
NUM_TOKENS, NUM_CLASSES = 300, 400
CASES = {
  # Two hidden chunks (D = 256, hidden_block = 128): the forward slices chunks from its slots,
  # the backward subtracts the smoothing offset from its whole dC block; bias.
  "f32-chunked-bias-smoothing": dict(
    dtype="float32",
    hidden=256,
    bias=True,
    options=dict(label_smoothing=0.2, z_loss=0.05),
    blocks=TPUBlockSizes(token_block=128, vocab_block=128, hidden_block=128),
  ),
  # One hidden chunk of D = 200 (not a whole number of lanes), bf16, softcap.
  "bf16-softcap": dict(
    dtype="bfloat16",
    hidden=200,
    bias=False,
    options=dict(softcap=20.0, z_loss=0.01),
    blocks=TPUBlockSizes(token_block=128, vocab_block=128),
  ),
}


def _inputs(case: dict, seed: int):
  rng = np.random.default_rng(seed)
  e = (rng.normal(size=(NUM_TOKENS, case["hidden"])) * 0.4 + 0.05).astype(np.float32)
  c = (rng.normal(size=(NUM_CLASSES, case["hidden"])) * 0.4 - 0.02).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=(NUM_TOKENS,)).astype(np.int32)
  labels[rng.random(NUM_TOKENS) < 0.1] = -100
  bias = rng.normal(size=(NUM_CLASSES,)).astype(np.float32) if case["bias"] else None
  return e, c, labels, bias


def _opts(case: dict, **overrides) -> LossOptions:
  values = dict(filter_eps=1e-30, block_sizes=case["blocks"], interpret=True, **case["options"])
  values.update(overrides)
  return LossOptions(**values)


@pytest.mark.parametrize("name", list(CASES))
def test_grouped_sort_against_float64(name):
  """Loss and every gradient with the grouped sort on (filtering on with a threshold that
  skips nothing, so the result is exact): c read by groups, dC written back by groups."""
  case = CASES[name]
  e, c, labels, bias = _inputs(case, zlib.crc32(name.encode()))
  dtype = jnp.dtype(case["dtype"])
  cast = lambda x: None if x is None else jnp.asarray(x, dtype)
  geo = implementation.geometry(cast(e), cast(c), _opts(case))
  assert implementation.sort_group(geo, _opts(case)) == 16  # the grouped path runs

  options = dict(softcap=None, shift=0, classifier_layout="vd", reduction="mean")
  options.update(label_smoothing=0.0, z_loss=0.0)
  options.update(case["options"])
  expected = reference64.reference(e, c, labels, bias, ignore_index=-100, **options)

  def loss_fn(e, c, bias):
    return cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      bias=bias,
      impl="pallas_tpu",
      filter_eps=1e-30,
      block_sizes=case["blocks"],
      interpret=True,
      ignore_index=-100,
      **options,
    )

  loss, (d_e, d_c, d_bias) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(
    cast(e), cast(c), cast(bias)
  )
  tol = TOLERANCE[case["dtype"]]
  assert_rel_close("loss", loss, expected["loss"], 2e-5 if dtype == jnp.float32 else 1e-3)
  assert d_e.dtype == dtype and d_c.dtype == dtype
  assert_rel_close("d_e", d_e, expected["d_e"], tol)
  assert_rel_close("d_c", d_c, expected["d_c"], tol)
  if bias is not None:
    assert_rel_close("d_bias", d_bias, expected["d_bias"], tol)


def _filtered_grads(e, c, labels, blocks: TPUBlockSizes, filter_eps: float):
  loss_fn = lambda e, c: cce_jax.linear_cross_entropy(
    e,
    c,
    labels,
    reduction="sum",
    impl="pallas_tpu",
    filter_eps=filter_eps,
    block_sizes=blocks,
    interpret=True,
  )
  return jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(e, c)


def test_grouped_filtering_drops_exactly_the_skipped_tiles():
  """With filtering on, the grouped sort's gradient is the exact one less the tiles its skip
  table drops, each class's tile column taken from the group order; and the skip table of
  the kernels is the one ``cce_jax.filtering`` computes from that order."""
  num_tokens, hidden, num_classes = 200, 64, 2000  # 125 groups; 2 x 16 tiles of 128 x 128
  filter_eps = 5e-2
  e, c, labels = synthetic.trained_like_inputs(
    jax.random.key(2), num_tokens, hidden, num_classes, jnp.float32
  )
  blocks = TPUBlockSizes(token_block=128, vocab_block=128)
  opts = LossOptions(filter_eps=filter_eps, block_sizes=blocks, interpret=True)
  inputs = TiledInputs(e, c, labels, None)
  skip = np.asarray(
    jax.jit(lambda inputs: implementation.skip_table(inputs, jnp.ones_like, opts))(inputs)
  )
  assert skip.mean() >= 0.1, f"only {skip.mean():.2f} of the tiles skipped: test too weak"

  score = np.asarray(e, np.float64).mean(0) @ np.asarray(c, np.float64).T  # (V,)
  order = column_slabs.slab_order(jnp.asarray(score, jnp.float32), 16)
  dx, dropped = skipped_softmax_grad(e, c, labels, skip, order, tile=128)
  e64, c64 = np.asarray(e, np.float64), np.asarray(c, np.float64)
  assert np.abs(dx[dropped]).max() < filter_eps
  kept = np.where(dropped, 0.0, dx)
  d_e, d_c = _filtered_grads(e, c, labels, blocks, filter_eps)
  assert_rel_close("d_e", d_e, kept @ c64, 2e-5)
  assert_rel_close("d_c", d_c, kept.T @ e64, 2e-5)


def test_backward_block_max_merges_forward_blocks():
  """(N, forward blocks) maxima -> (N, backward blocks): the max over each backward block's
  forward blocks, the ragged last one padded with -inf."""
  tiles = resolve(TPUBlockSizes(128, 512), 40, 64, 1100, jnp.float32, True)  # 3 blocks of 512
  tiles = tiles._replace(forward_vocab_block=256, num_forward_vocab_blocks=5)
  geo = implementation.Geometry(40, 1100, 64, 0, tiles)
  block_max = np.random.default_rng(1).normal(size=(40, 5)).astype(np.float32)
  merged = np.asarray(implementation.backward_block_max(jnp.asarray(block_max), geo))
  expected = np.stack([block_max[:, 0:2].max(1), block_max[:, 2:4].max(1), block_max[:, 4]], axis=1)
  np.testing.assert_array_equal(merged, expected)
  same = geo._replace(tiles=tiles._replace(forward_vocab_block=512, num_forward_vocab_blocks=3))
  unchanged = implementation.backward_block_max(jnp.asarray(merged), same)
  np.testing.assert_array_equal(np.asarray(unchanged), merged)


@pytest.mark.slow
def test_forward_vocab_block_merges_into_the_backward(monkeypatch):
  """A forward with half the backward's vocabulary block (what the v5e/v6e defaults pick at
  large shapes) gives the same block maxima, skip table and gradients as one with the same
  block; ragged V, the last backward block one forward block wide."""
  num_tokens, hidden, num_classes = 200, 32, 1296  # 81 groups: 6 blocks of 256, the last 16
  e, c, labels = synthetic.trained_like_inputs(
    jax.random.key(5), num_tokens, hidden, num_classes, jnp.float32
  )
  blocks = TPUBlockSizes(token_block=128, vocab_block=256)
  same = resolve(blocks, num_tokens, hidden, num_classes, jnp.float32, True)
  assert same.forward_vocab_block == 256
  split = same._replace(forward_vocab_block=128, num_forward_vocab_blocks=-(-num_classes // 128))
  opts = LossOptions(filter_eps=5e-2, block_sizes=blocks, interpret=True)
  inputs = TiledInputs(e, c, labels, None)

  def run(tiles):
    monkeypatch.setattr(implementation, "resolve", lambda *args, **kwargs: tiles)
    forward = jax.jit(lambda x: implementation.forward(x, opts, for_backward=True))(inputs)
    skip = jax.jit(lambda x: implementation.skip_table(x, jnp.ones_like, opts))(inputs)
    return forward.residuals.block_max, skip, _filtered_grads(e, c, labels, blocks, 5e-2)

  block_max, skip, grads = run(split)
  expected_max, expected_skip, expected_grads = run(same)
  assert block_max.shape == (num_tokens, 6)
  np.testing.assert_array_equal(np.asarray(block_max), np.asarray(expected_max))
  np.testing.assert_array_equal(np.asarray(skip), np.asarray(expected_skip))
  assert 0.0 < float(np.mean(np.asarray(skip))) < 1.0  # some tiles skipped, not all
  for actual, expected in zip(grads, expected_grads, strict=True):
    assert_rel_close("grad", actual, expected, 1e-6)


def test_grouped_sort_under_vmap():
  """Under jax.vmap (one folded forward with one group order, the backward example by
  example) the grouped sort's loss and gradients are those of the "xla" implementation."""
  rng = np.random.default_rng(8)
  e = jnp.asarray(rng.normal(size=(3, 13, 24)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(80, 24)) * 0.5, jnp.float32)  # 5 groups of 16
  labels = jnp.asarray(rng.integers(0, 80, size=(3, 13)), jnp.int32)

  def total(impl, blocks):
    per_example = lambda e1, c, labels1: cce_jax.linear_cross_entropy(
      e1, c, labels1, impl=impl, block_sizes=blocks, interpret=True, filter_eps=1e-30
    )
    batched = jax.vmap(per_example, in_axes=(0, None, 0))
    loss_fn = lambda e, c: jnp.sum(batched(e, c, labels))
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(e, c)

  loss, (d_e, d_c) = total("pallas_tpu", TPUBlockSizes(token_block=128, vocab_block=128))
  loss_xla, (d_e_xla, d_c_xla) = total("xla", cce_jax.BlockSizes(token_block=8, vocab_block=32))
  assert_rel_close("loss", loss, loss_xla, 2e-5)
  assert_rel_close("d_e", d_e, d_e_xla, 2e-5)
  assert_rel_close("d_c", d_c, d_c_xla, 2e-5)


def test_group_order_lists_the_groups_of_a_slab_order():
  score = jnp.asarray(np.random.default_rng(0).normal(size=(96,)), jnp.float32)
  order = column_slabs.slab_order(score, 32)
  groups = np.asarray(implementation.group_order(order))
  np.testing.assert_array_equal(np.asarray(order).reshape(-1, 16)[:, 0] // 16, groups)
  expected_first = int(np.argmax(np.asarray(score).reshape(3, 32).max(1)))
  assert groups[:2].tolist() == [2 * expected_first, 2 * expected_first + 1]


@pytest.mark.parametrize(
  "num_classes, layout, group, grouped",
  [(400, "vd", 16, True), (408, "vd", 16, False), (400, "dv", 16, False), (400, "vd", 1, False)],
  ids=["groups", "ragged_v_copies", "dv_layout_copies", "per_class_copies"],
)
def test_where_c_is_read_by_groups(num_classes, layout, group, grouped):
  """Groups when V is a whole number of them in the (V, D) layout; else the sorted copy."""
  opts = LossOptions(
    filter_eps=1e-3,
    classifier_layout=layout,
    block_sizes=TPUBlockSizes(128, 128, vocab_sort_group=group),
  )
  e = jax.ShapeDtypeStruct((300, 256), jnp.float32)
  c_shape = (num_classes, 256) if layout == "vd" else (256, num_classes)
  geo = implementation.geometry(e, jax.ShapeDtypeStruct(c_shape, jnp.float32), opts)
  assert (implementation.sort_group(geo, opts) is not None) == grouped


@pytest.mark.parametrize("value, error", [(8, ValueError), (256, ValueError), (16.0, TypeError)])
def test_vocab_sort_group_validation(value, error):
  with pytest.raises(error, match="vocab_sort_group"):
    TPUBlockSizes(vocab_sort_group=value)
  assert 16 in VOCAB_SORT_GROUPS and kernels.GROUP_ROWS == 16
