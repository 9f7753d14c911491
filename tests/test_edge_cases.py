"""No tokens, every token ignored, bad labels, odd block sizes, and the (D, V) layout's memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
from testing import assert_rel_close

import cce_jax

IMPLS = ("xla", "reference")
HIDDEN, NUM_CLASSES = 12, 37


def _inputs(batch: int, seq_len: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  e = jnp.asarray(rng.normal(size=(batch, seq_len, HIDDEN)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(NUM_CLASSES, HIDDEN)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, size=(batch, seq_len)), jnp.int32)
  return e, c, labels


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_mean_is_zero_with_zero_gradients(impl):
  e, c, labels = _inputs(2, 6)
  labels = jnp.full_like(labels, -100)
  loss, grads = jax.value_and_grad(
    lambda e, c: cce_jax.linear_cross_entropy(e, c, labels, impl=impl), argnums=(0, 1)
  )(e, c)
  assert float(loss) == 0.0
  for grad in grads:
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
  ("batch", "seq_len", "shift"), [(0, 5, 0), (2, 0, 0), (2, 1, 1), (3, 4, 4)]
)
def test_no_tokens(impl, batch, seq_len, shift):
  e, c, labels = _inputs(batch, seq_len)
  for reduction in ("mean", "sum"):
    loss, (d_e, d_c) = jax.value_and_grad(
      lambda e, c, r=reduction: cce_jax.linear_cross_entropy(
        e, c, labels, impl=impl, shift=shift, reduction=r
      ),
      argnums=(0, 1),
    )(e, c)
    assert float(loss) == 0.0 and not np.any(d_e) and not np.any(d_c)
  loss, lse = cce_jax.linear_cross_entropy(
    e, c, labels, impl=impl, shift=shift, reduction="none", return_lse=True
  )
  assert loss.shape == lse.shape == (batch, seq_len - shift)


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_label_poisons_loss_and_gradients(impl):
  e, c, labels = _inputs(2, 5)
  bad = labels.at[1, 2].set(NUM_CLASSES).at[0, 0].set(-5)
  per_token = cce_jax.linear_cross_entropy(e, c, bad, impl=impl, reduction="none")
  assert np.isnan(per_token[1, 2]) and np.isnan(per_token[0, 0])
  assert np.isfinite(np.delete(np.asarray(per_token).ravel(), [0, 7])).all()
  loss, (d_e, d_c) = jax.value_and_grad(
    lambda e, c: cce_jax.linear_cross_entropy(e, c, bad, impl=impl), argnums=(0, 1)
  )(e, c)
  assert np.isnan(loss)
  assert np.isnan(np.asarray(d_e)).any() and np.isnan(np.asarray(d_c)).any()


@pytest.mark.parametrize(
  "blocks", [cce_jax.BlockSizes(1, 1), cce_jax.BlockSizes(3, 5), cce_jax.BlockSizes(10**6, 10**6)]
)
def test_any_block_size_is_correct(blocks):
  e, c, labels = _inputs(2, 7, seed=3)
  bias = jnp.asarray(np.random.default_rng(4).normal(size=(NUM_CLASSES,)), jnp.float32)
  loss, grads = jax.value_and_grad(
    lambda e, c, b: cce_jax.linear_cross_entropy(
      e, c, labels, bias=b, block_sizes=blocks, filter_eps=None, label_smoothing=0.1
    ),
    argnums=(0, 1, 2),
  )(e, c, bias)
  want = reference64.mean_reference(e, c, labels, bias, label_smoothing=0.1)
  assert_rel_close("loss", loss, want["loss"], 2e-6)
  for name, got in zip(("d_e", "d_c", "d_bias"), grads, strict=True):
    assert_rel_close(name, got, want[name], 2e-5)


def test_float64_inputs_under_x64():
  with jax.enable_x64(True):
    e, c, labels = _inputs(2, 5, seed=5)
    e, c = e.astype(jnp.float64), c.astype(jnp.float64)
    loss, d_e = jax.value_and_grad(
      lambda e: cce_jax.linear_cross_entropy(e, c, labels.astype(jnp.int64), filter_eps=None)
    )(e)
    want = reference64.mean_reference(e, c, labels)
    assert d_e.dtype == jnp.float64
    assert_rel_close("loss", loss, want["loss"], 1e-6)
    assert_rel_close("d_e", d_e, want["d_e"], 1e-5)


def _temp_bytes(layout: str, num_tokens=2048, hidden=512, num_classes=32768) -> int:
  shape_c = (num_classes, hidden) if layout == "vd" else (hidden, num_classes)
  args = (
    jax.ShapeDtypeStruct((num_tokens, hidden), jnp.float32),
    jax.ShapeDtypeStruct(shape_c, jnp.float32),
    jax.ShapeDtypeStruct((num_tokens,), jnp.int32),
  )
  fn = jax.value_and_grad(
    lambda e, c, y: cce_jax.linear_cross_entropy(e, c, y, classifier_layout=layout),
    argnums=(0, 1),
  )
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_dv_layout_makes_no_transposed_copy_of_c():
  classifier_bytes = 32768 * 512 * 4
  vd, dv = _temp_bytes("vd"), _temp_bytes("dv")
  assert dv < classifier_bytes / 2, (dv, classifier_bytes)
  assert dv < 1.5 * vd, (dv, vd)


@pytest.mark.parametrize("wrapped_class", [0, 5])
def test_int64_labels_beyond_int32_are_bad_labels_not_wrapped(wrapped_class):
  e, c, labels = _inputs(1, 4, seed=6)
  big = np.asarray(labels, np.int64)
  big[0, 1] = 2**32 + wrapped_class  # a plain int32 cast would make this class `wrapped_class`
  per_token = cce_jax.linear_cross_entropy(e, c, big, reduction="none")
  assert np.isnan(per_token[0, 1]) and np.isfinite(np.delete(np.asarray(per_token), 1)).all()
  with pytest.raises(ValueError, match=r"`labels` .* the first is 4294967\d+ at index \(0, 1\)"):
    cce_jax.linear_cross_entropy(e, c, big, check_labels=True)
  with jax.enable_x64(True):  # traced int64 labels take the same path inside jit
    traced = jax.jit(lambda y: cce_jax.linear_cross_entropy(e, c, y, reduction="none"))
    assert np.isnan(traced(jnp.asarray(big))[0, 1])


def test_block_sizes_accept_numpy_ints():
  blocks = cce_jax.BlockSizes(np.int64(8), np.int32(16))
  assert blocks == cce_jax.BlockSizes(8, 16) and type(blocks.token_block) is int


@pytest.mark.parametrize(("dtype", "tiles"), [("float32", 1), ("bfloat16", 9), ("float16", 9)])
def test_default_block_sizes_follow_the_dtype(dtype, tiles):
  # 600 tokens x 1100 classes: one f32 tile (1024 x 2048), 3 x 3 tiles of 256 x 512 for 16-bit.
  rng = np.random.default_rng(10)
  e = jnp.asarray(rng.normal(size=(600, 8)), dtype)
  c = jnp.asarray(rng.normal(size=(1100, 8)), dtype)
  labels = jnp.asarray(rng.integers(0, 1100, size=(600,)), jnp.int32)
  assert int(cce_jax.filter_stats(e, c, labels)["total_tiles"]) == tiles
