"""Gradient filtering: real skipped work, the vocabulary sort, and the error it costs.

The error bound. A skipped tile drops entries of the softmax gradient ``dz_nv`` that are all
below ``eps * |g_n|`` (docs/math.md's rule times the row's cotangent). Only such entries can be
dropped, so with ``small_nv = [|dz_nv| < eps |g_n|]``:

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
from cce_jax import synthetic

BLOCKS = cce_jax.BlockSizes(token_block=16, vocab_block=64)
NUM_TOKENS, HIDDEN, NUM_CLASSES = 200, 32, 1000  # ragged in both axes


def _trained_like(seed: int, dtype=jnp.float32):
  return synthetic.trained_like_inputs(
      jax.random.key(seed), NUM_TOKENS, HIDDEN, NUM_CLASSES, dtype
  )


def _grads(e, c, labels, **options):
  loss_fn = lambda e, c: cce_jax.linear_cross_entropy(e, c, labels, block_sizes=BLOCKS, **options)
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


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_trained_like_inputs_skip_tiles_and_the_sort_helps(dtype):
  e, c, labels = _trained_like(1, jnp.dtype(dtype))
  eps = "auto" if dtype == "bfloat16" else 1e-3
  sorted_stats = cce_jax.filter_stats(e, c, labels, block_sizes=BLOCKS, filter_eps=eps)
  unsorted_stats = cce_jax.filter_stats(
      e, c, labels, block_sizes=BLOCKS, filter_eps=eps, sort_vocab=False
  )
  total = int(sorted_stats["total_tiles"])
  assert total == -(-NUM_TOKENS // 16) * -(-NUM_CLASSES // 64)
  assert 0 < int(sorted_stats["skipped_tiles"]) < total
  assert float(sorted_stats["skipped_fraction"]) > float(unsorted_stats["skipped_fraction"])


def test_uniform_inputs_skip_nothing_at_float32_auto_eps():
  e, c, labels = synthetic.uniform_inputs(jax.random.key(2), NUM_TOKENS, HIDDEN, NUM_CLASSES)
  stats = cce_jax.filter_stats(e, c, labels, block_sizes=BLOCKS)
  assert int(stats["skipped_tiles"]) == 0
  assert int(cce_jax.filter_stats(e, c, labels, filter_eps=None)["skipped_tiles"]) == 0


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_filtered_gradient_error_is_within_the_skipped_mass(label_smoothing):
  eps = 1e-3
  e, c, labels = _trained_like(3)
  options = dict(label_smoothing=label_smoothing)
  loss, (d_e, d_c) = _grads(e, c, labels, filter_eps=eps, **options)
  exact = reference64.reference(
      e, c, labels, None, ignore_index=-100, softcap=None, reduction="mean", shift=0,
      z_loss=0.0, label_smoothing=label_smoothing, classifier_layout="vd",
  )
  stats = cce_jax.filter_stats(e, c, labels, block_sizes=BLOCKS, filter_eps=eps, **options)
  assert int(stats["skipped_tiles"]) > 0
  assert float(loss) == pytest.approx(float(exact["loss"]), rel=1e-6)  # forward unchanged

  reference64.assert_filtered_within_dropped_mass(
      d_e, d_c, exact, reference64.small_entry_bounds(e, c, labels, label_smoothing, eps))


def test_filter_flags_keep_each_gradient_exact():
  e, c, labels = _trained_like(4)
  _, (d_e_exact, d_c_exact) = _grads(e, c, labels, filter_eps=None)
  _, (d_e_keep_e, d_c_filtered) = _grads(e, c, labels, filter_eps=1e-3, filter_e_grad=False)
  _, (d_e_filtered, d_c_keep_c) = _grads(e, c, labels, filter_eps=1e-3, filter_c_grad=False)
  assert_rel_close("d_e (filter_e_grad=False)", d_e_keep_e, d_e_exact, 1e-6)
  assert_rel_close("d_c (filter_c_grad=False)", d_c_keep_c, d_c_exact, 1e-6)
  assert not np.allclose(d_c_filtered, d_c_exact, rtol=0, atol=1e-9)
  assert not np.allclose(d_e_filtered, d_e_exact, rtol=0, atol=1e-9)


def test_softcap_with_label_smoothing_never_skips():
  e, c, labels = _trained_like(5)
  options = dict(softcap=3.0, label_smoothing=0.1)
  stats = cce_jax.filter_stats(e, c, labels, block_sizes=BLOCKS, filter_eps=0.5, **options)
  assert int(stats["skipped_tiles"]) == 0
  _, exact = _grads(e, c, labels, filter_eps=None, **options)
  _, filtered = _grads(e, c, labels, filter_eps=0.5, **options)
  for name, got, want in zip(("d_e", "d_c"), filtered, exact, strict=True):
    assert_rel_close(name, got, want, 1e-6)
