"""Gradient filtering: real skipped work, the vocabulary sort, and the error it costs, for
every implementation (parametrized over ``impl``), and one skip rule shared by all of them.

The error bound. A skipped tile drops entries of the softmax gradient ``dz_nv`` that are all
below ``eps * |g_n|`` (the rule of ``docs/math.md`` times the row's cotangent). Only such
entries can be dropped, so with ``small_nv = [|dz_nv| < eps |g_n|]``:

    ||dE_n(filtered) - dE_n(exact)|| <= sum_v small_nv |dz_nv| ||c_v||
    ||dC_v(filtered) - dC_v(exact)|| <= sum_n small_nv |dz_nv| ||e_n||

computed here in float64 from the exact softmax. The uniform label-smoothing term is never part
of ``dz`` in a tile (it is added exactly outside), so it is not in the bound either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
from testing import assert_rel_close, primitive_names

import cce_jax
from cce_jax import checks, dispatch, synthetic
from cce_jax.tiled import TiledInputs
from pallas_kernels.gpu import GPUBlockSizes
from pallas_kernels.tpu import TPUBlockSizes

NUM_TOKENS, HIDDEN, NUM_CLASSES = 200, 32, 1000  # ragged in both axes
# The implementations whose filtering is checked here, with small tiles ragged in every axis.
# (pallas_tpu's 128-multiple tiles get their own filtering tests in tests/test_pallas_tpu.py.)
FILTERING = {
  "xla": dict(impl="xla", block_sizes=cce_jax.BlockSizes(token_block=16, vocab_block=64)),
  "pallas_gpu": dict(
    impl="pallas_gpu",
    interpret=True,
    block_sizes=GPUBlockSizes(token_block=16, vocab_block=64, hidden_block=16),
  ),
}
BLOCKS = FILTERING["xla"]["block_sizes"]
# Relative tolerance of the forward value and of an exact gradient against float64.
LOSS_TOLERANCE = {"xla": 1e-6, "pallas_gpu": 1e-5}
GRAD_TOLERANCE = {"xla": 2e-5, "pallas_gpu": 2e-5}


def _trained_like(seed: int, dtype=jnp.float32):
  return synthetic.trained_like_inputs(jax.random.key(seed), NUM_TOKENS, HIDDEN, NUM_CLASSES, dtype)


def _grads(e, c, labels, impl: str = "xla", **options):
  loss_fn = lambda e, c: cce_jax.linear_cross_entropy(e, c, labels, **FILTERING[impl], **options)
  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(e, c)


def _backward_primitives(**options) -> set[str]:
  e, c, labels = _trained_like(0)
  loss_fn = lambda e, c: cce_jax.linear_cross_entropy(e, c, labels, block_sizes=BLOCKS, **options)
  jaxpr = jax.make_jaxpr(jax.grad(loss_fn, argnums=(0, 1)))(e, c).jaxpr
  return set(primitive_names(jaxpr))


def test_backward_skips_with_a_real_cond():
  assert "cond" in _backward_primitives(filter_eps=1e-4)
  assert "cond" not in _backward_primitives(filter_eps=None)
  # Nothing may be skipped with softcap and label smoothing together (docs/math.md).
  assert "cond" not in _backward_primitives(softcap=5.0, label_smoothing=0.1)


@pytest.mark.parametrize(
  "impl, dtype, eps",
  [
    ("xla", "bfloat16", "auto"),
    ("xla", "float32", 1e-3),
    ("pallas_gpu", "float32", 2.0**-12),
    ("pallas_gpu", "float32", 1e-3),
    # bfloat16 at its "auto" threshold; interpret mode multiplies bf16 slowly.
    pytest.param("pallas_gpu", "bfloat16", "auto", marks=pytest.mark.slow),
  ],
)
def test_trained_like_inputs_skip_tiles_and_the_sort_helps(impl, dtype, eps):
  e, c, labels = _trained_like(1, jnp.dtype(dtype))
  options = dict(FILTERING[impl], filter_eps=eps)
  sorted_stats = cce_jax.filter_stats(e, c, labels, **options)
  unsorted_stats = cce_jax.filter_stats(e, c, labels, **options, sort_vocab=False)
  total = int(sorted_stats["total_tiles"])
  assert total == int(unsorted_stats["total_tiles"]) == -(-NUM_TOKENS // 16) * -(-NUM_CLASSES // 64)
  skipped_sorted = int(sorted_stats["skipped_tiles"])
  assert 0 < skipped_sorted < total
  # The sort lets clearly more go (pallas_gpu, measured: 18 vs 0 of 208 tiles at 2**-12, 75
  # vs 1 at 1e-3).
  assert skipped_sorted > 1.5 * int(unsorted_stats["skipped_tiles"])
  assert float(sorted_stats["skipped_fraction"]) == pytest.approx(skipped_sorted / total)


def test_uniform_inputs_skip_nothing_at_float32_auto_eps():
  e, c, labels = synthetic.uniform_inputs(jax.random.key(2), NUM_TOKENS, HIDDEN, NUM_CLASSES)
  stats = cce_jax.filter_stats(e, c, labels, block_sizes=BLOCKS)
  assert int(stats["skipped_tiles"]) == 0
  assert int(cce_jax.filter_stats(e, c, labels, filter_eps=None)["skipped_tiles"]) == 0


@pytest.mark.parametrize(
  "impl, label_smoothing",
  [
    ("xla", 0.0),
    ("xla", 0.1),
    pytest.param("pallas_gpu", 0.0, marks=pytest.mark.slow),
    ("pallas_gpu", 0.1),
  ],
)
def test_filtered_gradient_error_is_within_the_skipped_mass(impl, label_smoothing):
  eps = 1e-3
  e, c, labels = _trained_like(3)
  options = dict(label_smoothing=label_smoothing)
  loss, (d_e, d_c) = _grads(e, c, labels, impl, filter_eps=eps, **options)
  exact = reference64.mean_reference(e, c, labels, label_smoothing=label_smoothing)
  stats = cce_jax.filter_stats(e, c, labels, **FILTERING[impl], filter_eps=eps, **options)
  assert int(stats["skipped_tiles"]) > 0
  # The forward is unchanged by filtering.
  assert float(loss) == pytest.approx(float(exact["loss"]), rel=LOSS_TOLERANCE[impl])

  reference64.assert_filtered_within_dropped_mass(
    d_e, d_c, exact, reference64.small_entry_bounds(e, c, labels, label_smoothing, eps)
  )


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
def test_filter_flags_keep_each_gradient_exact(impl):
  """With one flag off, that gradient skips nothing: the exact one, to rounding."""
  e, c, labels = _trained_like(4)
  exact = reference64.mean_reference(e, c, labels)
  _, (d_e_unfiltered, d_c_unfiltered) = _grads(e, c, labels, impl, filter_eps=None)
  _, (d_e_kept, d_c_filtered) = _grads(e, c, labels, impl, filter_eps=1e-3, filter_e_grad=False)
  _, (d_e_filtered, d_c_kept) = _grads(e, c, labels, impl, filter_eps=1e-3, filter_c_grad=False)
  assert_rel_close("d_e (filter_e_grad=False)", d_e_kept, d_e_unfiltered, 1e-6)
  assert_rel_close("d_c (filter_c_grad=False)", d_c_kept, d_c_unfiltered, 1e-6)
  assert_rel_close("d_e (filter_e_grad=False)", d_e_kept, exact["d_e"], GRAD_TOLERANCE[impl])
  assert_rel_close("d_c (filter_c_grad=False)", d_c_kept, exact["d_c"], GRAD_TOLERANCE[impl])
  # The filtered ones did lose something (1e-3 is far above float32 rounding).
  for name, got, want in (("d_e", d_e_filtered, exact["d_e"]), ("d_c", d_c_filtered, exact["d_c"])):
    err = np.max(np.abs(np.asarray(got, np.float64) - want))
    assert err > 1e-4 * np.abs(want).max(), name  # 10x float32 accumulation error


def test_softcap_with_label_smoothing_never_skips():
  e, c, labels = _trained_like(5)
  options = dict(softcap=3.0, label_smoothing=0.1)
  stats = cce_jax.filter_stats(e, c, labels, block_sizes=BLOCKS, filter_eps=0.5, **options)
  assert int(stats["skipped_tiles"]) == 0
  _, exact = _grads(e, c, labels, filter_eps=None, **options)
  _, filtered = _grads(e, c, labels, filter_eps=0.5, **options)
  for name, got, want in zip(("d_e", "d_c"), filtered, exact, strict=True):
    assert_rel_close(name, got, want, 1e-6)


# ---- one skip rule for every implementation ---------------------------------------------------


def test_skip_tables_of_every_implementation_agree_tile_for_tile():
  """Where the tilings coincide (N a whole number of 128-token blocks; the ragged last
  vocabulary block overlaps in "xla" and "pallas_gpu" and is masked in "pallas_tpu", which
  leaves it the same live classes), the three skip tables are the same table."""
  num_tokens, hidden, num_classes, block = 256, 64, 1000, 128
  e, c, _ = synthetic.trained_like_inputs(
    jax.random.key(1), num_tokens, hidden, num_classes, jnp.float32
  )
  # Targets a trained model predicts (its top class), so that targets cluster in few tiles,
  # and an ignored token (filter scale 0, never holds a target).
  labels = jnp.argmax(e @ c.T, axis=1).astype(jnp.int32).at[3].set(-100)
  blocks = {
    "xla": cce_jax.BlockSizes(token_block=block, vocab_block=block),
    "pallas_gpu": GPUBlockSizes(token_block=block, vocab_block=block, hidden_block=32),
    "pallas_tpu": TPUBlockSizes(token_block=block, vocab_block=block),
  }
  options = dict(filter_eps=1e-2, interpret=True)
  opts = {
    impl: checks.build_options(
      dtype=e.dtype,
      ignore_index=-100,
      softcap=None,
      z_loss=0.0,
      label_smoothing=0.0,
      filter_eps=1e-2,
      filter_e_grad=True,
      filter_c_grad=True,
      sort_vocab=True,
      classifier_layout="vd",
      block_sizes=sizes,
      implementation=dispatch.implementation(impl),
      interpret=True,
    )
    for impl, sizes in blocks.items()
  }
  held = jnp.where(labels == -100, -1, labels)
  counted = (labels != -100).astype(jnp.float32)  # the filter scale of the loss alone
  tables = {
    impl: np.asarray(
      dispatch.implementation(impl).skip_table(
        TiledInputs(e, c, held, None), lambda lse: counted, opts[impl]
      )
    )
    for impl in blocks
  }
  shape = (num_tokens // block, -(-num_classes // block))
  for impl, table in tables.items():
    assert table.shape == shape and table.dtype == bool, impl
  # The public count is the table's (for "xla" and "pallas_gpu" see the tests above).
  stats = cce_jax.filter_stats(
    e, c, labels, impl="pallas_tpu", block_sizes=blocks["pallas_tpu"], **options
  )
  assert int(stats["skipped_tiles"]) == int(tables["pallas_tpu"].sum())
  assert int(stats["total_tiles"]) == tables["pallas_tpu"].size
  assert 0 < tables["xla"].sum() < tables["xla"].size, tables["xla"]
  np.testing.assert_array_equal(tables["pallas_gpu"], tables["xla"])
  np.testing.assert_array_equal(tables["pallas_tpu"], tables["xla"])
  # The reference has one tile and never skips it.
  stats = cce_jax.filter_stats(e, c, labels, impl="reference", **options)
  assert (int(stats["skipped_tiles"]), int(stats["total_tiles"])) == (0, 1)
