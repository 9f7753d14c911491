"""``cce_jax.token_stats`` against the float64 reference of the materialized logits.

Every field (lse, entropy, argmax, logprob, correct) and the gradients of lse, entropy and
logprob, for "xla" (streamed tiles) and "reference", on sizes that no block divides, with bias,
masked classes, softcap, shift, ignored and out-of-range labels, both classifier layouts, exact
argmax ties, ``jax.jit`` and ``jax.vmap``; the same checks for "pallas_gpu" and "pallas_tpu"
in interpret mode (slow: most of their cases are marked so; their CUDA and TPU lowerings:
``tests/test_token_stats_pallas.py``). (``mesh=`` over 8 host devices:
``tests/multidevice/test_token_stats_shard.py``.)
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import stats64
from testing import assert_rel_close

import cce_jax
from cce_jax import local_stats
from pallas_kernels.gpu import GPUBlockSizes
from pallas_kernels.tpu import TPUBlockSizes

# 2 x 13 tokens, V = 203 classes, D = 16: ragged for the 8 x 32 tiles below.
BATCH, SEQ_LEN, HIDDEN, NUM_CLASSES = 2, 13, 16, 203
BLOCKS = cce_jax.BlockSizes(token_block=8, vocab_block=32)
IMPLS = ("xla", "reference")
# The Pallas forwards in interpret mode, on tiles that V, N and D do not fill: GPU 16 tokens x
# 32 classes x 16 hidden in 2 vocabulary splits (the last class block overlapping); TPU the
# smallest tiles, 128 x 128 (two vocabulary blocks, the second ragged).
PALLAS_BLOCKS = {
  "pallas_gpu": GPUBlockSizes(token_block=16, vocab_block=32, hidden_block=16, vocab_splits=2),
  "pallas_tpu": TPUBlockSizes(token_block=128, vocab_block=128, hidden_block=128),
}
SLOW_PALLAS = tuple(pytest.param(impl, marks=pytest.mark.slow) for impl in PALLAS_BLOCKS)
SEEDS = {"xla": 0, "reference": 1, "pallas_gpu": 100, "pallas_tpu": 200}
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-4}


def _impl_options(impl: str) -> dict:
  """``impl``, its test tiles and ``interpret`` for a Pallas one."""
  pallas = impl in PALLAS_BLOCKS
  return dict(impl=impl, block_sizes=PALLAS_BLOCKS.get(impl, BLOCKS), interpret=pallas)


def _inputs(seed: int, dtype: str = "float32", layout: str = "vd", masked=None):
  """Random e (B, T, D), c (layout), labels (B, T) with ignored ones, bias (V,)."""
  rng = np.random.default_rng(seed)
  e = rng.normal(size=(BATCH, SEQ_LEN, HIDDEN))
  c = rng.normal(size=(NUM_CLASSES, HIDDEN)) * 0.5
  bias = rng.normal(size=(NUM_CLASSES,)).astype(np.float32)
  allowed = np.arange(NUM_CLASSES)
  if masked is not None:
    bias[masked] = -np.inf
    allowed = np.setdiff1d(allowed, masked)
  labels = rng.choice(allowed, size=(BATCH, SEQ_LEN)).astype(np.int32)
  labels[0, 4] = labels[1, 9] = -100
  if layout == "dv":
    c = c.T
  return (
    jnp.asarray(e, dtype),
    jnp.asarray(c, dtype),
    jnp.asarray(labels),
    jnp.asarray(bias),
  )


def _check_argmax(name: str, argmax, z64, atol: float) -> None:
  """``argmax`` picks a largest logit of the float64 logits ``z64`` (within ``atol``: f32
  rounding may reorder near-ties), and the float64 argmax on all but a few rows."""
  argmax = np.asarray(argmax)
  assert argmax.dtype == np.int32, f"{name}: dtype {argmax.dtype}"
  picked = np.take_along_axis(z64, argmax[..., None], axis=-1)[..., 0]
  assert np.all(picked >= z64.max(axis=-1) - atol), f"{name}: not a largest logit"
  assert np.mean(argmax == z64.argmax(axis=-1)) > 0.9, f"{name}: differs from the f64 argmax"


def _check_fields(stats, expected, labels, shift: int, tol: float, ignore_index: int = -100):
  assert_rel_close("lse", stats.lse, expected["lse"], tol)
  assert_rel_close("entropy", stats.entropy, expected["entropy"], 10 * tol)
  _check_argmax("argmax", stats.argmax, expected["z"], atol=50 * tol)
  targets = np.asarray(labels)[..., shift:]
  counted = targets != ignore_index
  assert_rel_close("logprob", stats.logprob, expected["logprob"], tol)
  chex.assert_trees_all_equal(np.asarray(stats.logprob)[~counted], np.zeros((~counted).sum()))
  expected_correct = counted & (np.asarray(stats.argmax) == targets)
  chex.assert_trees_all_equal(np.asarray(stats.correct), expected_correct)
  assert np.asarray(stats.correct).dtype == np.bool_


def _fields_match_the_float64_reference(impl, dtype, layout, softcap):
  seed = SEEDS[impl] + 2 * (dtype == "bfloat16") + 4 * (layout == "dv") + 8 * bool(softcap)
  e, c, labels, bias = _inputs(seed, dtype, layout)
  options = dict(softcap=softcap, shift=1, classifier_layout=layout)
  stats = cce_jax.token_stats(e, c, labels, bias=bias, **_impl_options(impl), **options)
  expected = stats64.stats(e, c, labels, bias, **options)
  chex.assert_shape(list(stats), (BATCH, SEQ_LEN - 1))
  chex.assert_type([stats.lse, stats.entropy, stats.logprob], jnp.float32)
  _check_fields(stats, expected, labels, shift=1, tol=TOLERANCE[dtype])
  entropy = np.asarray(stats.entropy)
  assert np.all(entropy >= -1e-5) and np.all(entropy <= np.log(NUM_CLASSES) + 1e-5)


@pytest.mark.parametrize("impl", IMPLS + SLOW_PALLAS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fields_match_the_float64_reference(impl, dtype, layout, softcap):
  _fields_match_the_float64_reference(impl, dtype, layout, softcap)


@pytest.mark.parametrize(
  ("impl", "dtype", "layout", "softcap"),
  [
    ("pallas_gpu", "float32", "vd", None),
    ("pallas_tpu", "float32", "dv", 3.0),
    pytest.param("pallas_gpu", "bfloat16", "dv", 3.0, marks=pytest.mark.slow),
  ],
)
def test_pallas_fields_match_the_float64_reference(impl, dtype, layout, softcap):
  """One case of the (slow) matrix above per Pallas forward in the default suite."""
  _fields_match_the_float64_reference(impl, dtype, layout, softcap)


@pytest.mark.parametrize(
  ("impl", "layout", "softcap"),
  [
    *[(impl, layout, cap) for impl in IMPLS for layout in ("vd", "dv") for cap in (None, 3.0)],
    ("pallas_tpu", "dv", None),
    pytest.param("pallas_gpu", "vd", 3.0, marks=pytest.mark.slow),
    pytest.param("pallas_gpu", "dv", None, marks=pytest.mark.slow),
    pytest.param("pallas_tpu", "vd", 3.0, marks=pytest.mark.slow),
  ],
)
def test_gradients_match_the_float64_reference(impl, layout, softcap):
  """The gradient of a weighted sum of lse, entropy and logprob w.r.t. e, c and bias (for a
  Pallas impl: its forward kernel, then the "xla" tiled backward)."""
  e, c, labels, bias = _inputs(20 + SEEDS[impl] + 2 * (layout == "dv"), layout=layout)
  options = dict(softcap=softcap, shift=1, classifier_layout=layout)
  rng = np.random.default_rng(7)
  weights = {k: rng.normal(size=(BATCH, SEQ_LEN - 1)) for k in ("lse", "entropy", "logprob")}

  def objective(e, c, bias):
    stats = cce_jax.token_stats(e, c, labels, bias=bias, **_impl_options(impl), **options)
    return sum(jnp.sum(weights[k] * getattr(stats, k)) for k in weights)

  grads = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(e, c, bias)
  expected = stats64.stats_grads(e, c, labels, bias, weights, ignore_index=-100, **options)
  for name, grad in zip(("d_e", "d_c", "d_bias"), grads, strict=True):
    assert_rel_close(name, grad, expected[name], 1e-4)


def test_entropy_gradient_alone_is_minus_p_times_centered_logits():
  """Only the entropy differentiated (an RL entropy bonus): no bias, no labels."""
  e, c, _, _ = _inputs(31)
  weights = {"lse": np.zeros((BATCH, SEQ_LEN)), "logprob": np.zeros((BATCH, SEQ_LEN))}
  weights["entropy"] = np.ones((BATCH, SEQ_LEN))
  entropy_sum = lambda e, c: jnp.sum(cce_jax.token_stats(e, c, block_sizes=BLOCKS).entropy)
  d_e, d_c = jax.grad(entropy_sum, argnums=(0, 1))(e, c)
  labels = jnp.zeros((BATCH, SEQ_LEN), jnp.int32)
  expected = stats64.stats_grads(
    e, c, labels, None, weights, ignore_index=-100, softcap=None, shift=0, classifier_layout="vd"
  )
  assert_rel_close("d_e", d_e, expected["d_e"], 1e-4)
  assert_rel_close("d_c", d_c, expected["d_c"], 1e-4)


@pytest.mark.parametrize("impl", IMPLS + SLOW_PALLAS)
def test_masked_classes_give_finite_entropy_and_zero_gradients(impl):
  """A -inf bias over whole vocabulary tiles (and scattered classes): p = 0 adds 0 to the
  entropy (never 0 * -inf), the argmax avoids them, their gradients are exactly 0. (Classes
  0-129 are whole tiles of every impl: the first vocabulary split of "pallas_gpu" and the
  first block of "pallas_tpu" hold no finite logit.)"""
  masked = np.r_[0:130, 150, 202]
  e, c, labels, bias = _inputs(41, masked=masked)
  options = _impl_options(impl)
  stats = cce_jax.token_stats(e, c, labels, bias=bias, **options, shift=2)
  expected = stats64.stats(e, c, labels, bias, shift=2)
  _check_fields(stats, expected, labels, shift=2, tol=2e-5)
  assert not np.isin(np.asarray(stats.argmax), masked).any()

  def objective(c, bias):
    stats = cce_jax.token_stats(e, c, labels, bias=bias, **options, shift=2)
    return jnp.sum(stats.entropy) + jnp.sum(stats.logprob) + 0.5 * jnp.sum(stats.lse)

  d_c, d_bias = jax.grad(objective, argnums=(0, 1))(c, bias)
  assert np.all(np.isfinite(d_c)) and np.all(np.isfinite(d_bias))
  chex.assert_trees_all_equal(np.asarray(d_c)[masked], np.zeros((masked.size, HIDDEN)))
  chex.assert_trees_all_equal(np.asarray(d_bias)[masked], np.zeros((masked.size,)))


@pytest.mark.parametrize(
  ("impl", "dtype"),
  [
    *[(impl, dtype) for impl in IMPLS for dtype in ("float32", "bfloat16")],
    *[(impl, "float32") for impl in PALLAS_BLOCKS],
    *[pytest.param(impl, "bfloat16", marks=pytest.mark.slow) for impl in PALLAS_BLOCKS],
  ],
)
def test_argmax_ties_resolve_to_the_lowest_class_id(impl, dtype):
  """Classes with identical rows of c (and bias) have bit-identical logits; the winner is the
  lowest id, within a tile, across tiles and in the overlapped last tile, like jnp.argmax
  (for "pallas_gpu" also across its two vocabulary splits: 3 and 99 against 200)."""
  rng = np.random.default_rng(5)
  e = rng.normal(size=(3, 9, HIDDEN))
  c = rng.normal(size=(NUM_CLASSES, HIDDEN)) * 0.1
  # Token group g's hidden states point along a row that three classes share.
  ties = [(40, 45, 190), (3, 99, 200), (171, 180, 202)]  # in-tile, across tiles, last tile
  for group, ids in enumerate(ties):
    direction = rng.normal(size=HIDDEN)
    c[list(ids)] = 3.0 * direction
    e[group] = e[group] * 0.1 + direction
  e, c = jnp.asarray(e, dtype), jnp.asarray(c, dtype)
  stats = cce_jax.token_stats(e, c, **_impl_options(impl))
  logits = jnp.einsum("btd,vd->btv", e, c, preferred_element_type=jnp.float32)
  expected = np.broadcast_to(np.array([ids[0] for ids in ties])[:, None], (3, 9))
  chex.assert_trees_all_equal(np.asarray(jnp.argmax(logits, axis=-1)), expected)
  chex.assert_trees_all_equal(np.asarray(stats.argmax), expected)


@pytest.mark.parametrize("vocab_block", [33, 96, 384])
def test_argmax_of_integer_logits_with_many_ties(vocab_block):
  """Small integer e and c give exact integer logits (in f32 too), so that most rows tie at
  their maximum, often within one sub-block of a tile, across sub-blocks and across tiles:
  the argmax is numpy's (the lowest id), masked classes never win, and lse and entropy match
  the float64 reference. V = 1000 and 37 tokens are ragged for every block here."""
  rng = np.random.default_rng(vocab_block)
  e = rng.integers(-2, 3, size=(37, 6)).astype(np.float32)
  c = rng.integers(-2, 3, size=(1000, 6)).astype(np.float32)
  bias = np.zeros(1000, np.float32)
  bias[rng.choice(1000, size=100, replace=False)] = -np.inf
  blocks = cce_jax.BlockSizes(token_block=16, vocab_block=vocab_block)
  stats = cce_jax.token_stats(
    jnp.asarray(e), jnp.asarray(c), bias=jnp.asarray(bias), block_sizes=blocks
  )
  logits = e.astype(np.int64) @ c.astype(np.int64).T  # (37, 1000), exact
  logits = np.where(np.isinf(bias), np.iinfo(np.int64).min, logits)
  tied = np.sum(logits == logits.max(axis=-1, keepdims=True), axis=-1)
  assert np.mean(tied > 1) > 0.5, "the inputs must tie most rows"
  chex.assert_trees_all_equal(np.asarray(stats.argmax), logits.argmax(axis=-1).astype(np.int32))
  expected = stats64.stats(e, c, bias=bias)
  assert_rel_close("lse", stats.lse, expected["lse"], 2e-5)
  assert_rel_close("entropy", stats.entropy, expected["entropy"], 2e-4)


@pytest.mark.parametrize("num_columns", [1, 7, 8, 96, 384])
def test_tile_max_argmax_matches_numpy(num_columns):
  """The per-tile maximum and first argmax (by sub-block maxima) of integer-valued tiles
  with ties and rows of -inf, against numpy; ``first_class`` offsets the ids."""
  rng = np.random.default_rng(num_columns)
  z = rng.integers(-3, 4, size=(11, num_columns)).astype(np.float32)
  z[rng.random(z.shape) < 0.3] = -np.inf
  z[4] = -np.inf  # a row without a finite logit: id first_class, like jnp.argmax
  tile_max, argmax = jax.jit(local_stats._tile_max_argmax)(jnp.asarray(z), jnp.int32(500))
  chex.assert_trees_all_equal(np.asarray(tile_max), z.max(axis=-1))
  chex.assert_trees_all_equal(np.asarray(argmax), (500 + z.argmax(axis=-1)).astype(np.int32))


def test_cpu_forward_tiles_by_default_only():
  """Without block_sizes the CPU forward uses CPU_FORWARD_TILES (other platforms: the loss's
  defaults); the fields match the float64 reference with 2100 tokens and V = 700, ragged for
  those tiles, and the gradients too (the backward keeps the loss's tiles)."""
  assert local_stats.forward_block_sizes(jnp.float32, "cpu") == cce_jax.BlockSizes(2048, 512)
  assert local_stats.forward_block_sizes(jnp.bfloat16, "cpu") == cce_jax.BlockSizes(1024, 512)
  assert local_stats.forward_block_sizes(jnp.float32, "tpu") is None
  assert local_stats.forward_block_sizes(jnp.bfloat16, "gpu") is None
  rng = np.random.default_rng(11)
  e = jnp.asarray(rng.normal(size=(2100, 8)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(700, 8)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 700, size=2100), jnp.int32)
  stats = cce_jax.token_stats(e, c, labels)
  expected = stats64.stats(e, c, labels)
  assert_rel_close("lse", stats.lse, expected["lse"], 2e-5)
  assert_rel_close("entropy", stats.entropy, expected["entropy"], 2e-4)
  assert_rel_close("logprob", stats.logprob, expected["logprob"], 2e-5)
  _check_argmax("argmax", stats.argmax, expected["z"], atol=1e-3)
  entropy_sum = lambda e: jnp.sum(cce_jax.token_stats(e, c).entropy)
  tiled = jnp.sum(cce_jax.token_stats(e, c, block_sizes=BLOCKS).entropy)
  assert_rel_close("entropy sum", entropy_sum(e), tiled, 1e-5)
  assert_rel_close(
    "entropy grad",
    jax.grad(entropy_sum)(e),
    jax.grad(lambda e: jnp.sum(cce_jax.token_stats(e, c, impl="reference").entropy))(e),
    1e-4,
  )


@pytest.mark.parametrize(
  "impl", ["xla", "pallas_gpu", pytest.param("pallas_tpu", marks=pytest.mark.slow)]
)
def test_ignored_and_out_of_range_labels(impl):
  e, c, labels, _ = _inputs(51)
  labels = labels.at[0, 4].set(7).at[1, 9].set(8)  # no -100: out of range with ignore_index=3
  labels = labels.at[0, 2].set(NUM_CLASSES).at[1, 1].set(-7).at[1, 5].set(3)
  stats = cce_jax.token_stats(e, c, labels, ignore_index=3, **_impl_options(impl))
  logprob, correct = np.asarray(stats.logprob), np.asarray(stats.correct)
  assert np.isnan(logprob[0, 2]) and np.isnan(logprob[1, 1])  # bad labels: NaN, never plausible
  assert logprob[1, 5] == 0.0 and not correct[1, 5]  # ignore_index=3
  assert not correct[0, 2] and not correct[1, 1]
  assert np.isfinite(np.delete(logprob.ravel(), [2, SEQ_LEN + 1])).all()
  assert np.all(np.isfinite(stats.lse)) and np.all(np.isfinite(stats.entropy))
  with pytest.raises(ValueError, match=r"`labels` holds 2 value\(s\) outside \[0, V\)"):
    cce_jax.token_stats(e, c, labels, ignore_index=3, check_labels=True)


def test_without_labels_and_with_shift():
  e, c, labels, _ = _inputs(61)
  with_labels = cce_jax.token_stats(e, c, labels, shift=2, block_sizes=BLOCKS)
  without = cce_jax.token_stats(e, c, shift=2, block_sizes=BLOCKS)
  assert without.logprob is None and without.correct is None
  chex.assert_trees_all_close(without[:3], with_labels[:3], rtol=0, atol=0)
  chex.assert_shape(without.lse, (BATCH, SEQ_LEN - 2))
  empty = cce_jax.token_stats(e, c, labels, shift=SEQ_LEN)
  chex.assert_shape(list(empty), (BATCH, 0))


def test_two_dimensional_e_and_a_single_token():
  e, c, labels, bias = _inputs(71)
  flat = cce_jax.token_stats(e.reshape(-1, HIDDEN), c, labels.reshape(-1), bias=bias)
  batched = cce_jax.token_stats(e, c, labels, bias=bias)
  chex.assert_trees_all_close(
    jax.tree.map(lambda x: x.reshape(-1), batched), flat, rtol=1e-6, atol=1e-6
  )
  one = cce_jax.token_stats(e[:1, :1], c, labels[:1, :1], bias=bias, block_sizes=BLOCKS)
  expected = stats64.stats(e[:1, :1], c, labels[:1, :1], bias)
  assert_rel_close("lse", one.lse, expected["lse"], 2e-5)
  assert_rel_close("entropy", one.entropy, expected["entropy"], 2e-4)


@pytest.mark.parametrize("impl", ("xla", *SLOW_PALLAS))
def test_vmap_and_jit_match_the_plain_call(impl):
  """Under vmap a Pallas forward runs once over every example's tokens (TPU interpret mode
  cannot run a vmapped kernel)."""
  e, c, labels, bias = _inputs(81)
  options = _impl_options(impl)
  call = lambda e, labels: cce_jax.token_stats(e, c, labels, bias=bias, **options)
  mapped = jax.jit(jax.vmap(call))(e, labels)
  chex.assert_trees_all_close(mapped, call(e, labels), rtol=1e-6, atol=1e-6)

  def entropy_sum(e, labels):
    stats = call(e, labels)
    return jnp.sum(stats.entropy) - jnp.sum(stats.logprob)

  per_example = jax.vmap(jax.grad(entropy_sum))(e, labels)
  chex.assert_trees_all_close(per_example, jax.grad(entropy_sum)(e, labels), rtol=1e-5, atol=1e-6)


def test_mosaic_gpu_impl_raises_naming_the_supported_ones():
  e, c, labels, _ = _inputs(91)
  supported = r"'auto', 'xla', 'reference', 'pallas_gpu', 'pallas_tpu'"
  with pytest.raises(NotImplementedError, match=rf"`impl`='pallas_mosaic_gpu'.*{supported}"):
    cce_jax.token_stats(e, c, labels, impl="pallas_mosaic_gpu")


@pytest.mark.parametrize(
  ("impl", "map_c"),
  [
    ("pallas_tpu", False),
    pytest.param("pallas_gpu", False, marks=pytest.mark.slow),
    *[pytest.param(impl, True, marks=pytest.mark.slow) for impl in PALLAS_BLOCKS],
  ],
)
def test_pallas_forward_under_vmap(impl, map_c):
  """The examples folded into one kernel call; with a classifier mapped per example, one
  after another. Both equal the unmapped call."""
  e, c, labels, bias = _inputs(82)
  options = _impl_options(impl)
  plain = cce_jax.token_stats(e, c, labels, bias=bias, **options)
  call = lambda e, c, labels: cce_jax.token_stats(e, c, labels, bias=bias, **options)
  if map_c:
    mapped = jax.vmap(call)(e, jnp.stack([c, c]), labels)
  else:
    mapped = jax.vmap(call, in_axes=(0, None, 0))(e, c, labels)
  chex.assert_trees_all_close(mapped, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", list(PALLAS_BLOCKS))
def test_pallas_impl_without_interpret_on_cpu_names_interpret(impl):
  if jax.default_backend() != "cpu":
    pytest.skip("checks the refusal on a CPU backend")
  e, c, labels, _ = _inputs(91)
  with pytest.raises(ValueError, match=rf"`impl`='{impl}'.*`interpret=True`"):
    cce_jax.token_stats(e, c, labels, impl=impl)


def test_auto_is_xla():
  e, c, labels, bias = _inputs(92)
  auto = cce_jax.token_stats(e, c, labels, bias=bias)
  xla = cce_jax.token_stats(e, c, labels, bias=bias, impl="xla")
  chex.assert_trees_all_equal(auto, xla)


def test_second_order_and_forward_mode_raise():
  e, c, labels, _ = _inputs(93)
  entropy_sum = lambda e: jnp.sum(cce_jax.token_stats(e, c, labels).entropy)
  with pytest.raises(NotImplementedError, match="first-order reverse-mode"):
    jax.grad(lambda e: jnp.sum(jax.grad(entropy_sum)(e)))(e)
  with pytest.raises(TypeError, match="custom_vjp"):
    jax.jvp(entropy_sum, (e,), (e,))


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    (dict(labels=jnp.zeros((BATCH, SEQ_LEN + 1), jnp.int32)), ValueError, "`labels` must have"),
    (dict(labels=jnp.zeros((BATCH, SEQ_LEN))), TypeError, "`labels` must be an integer"),
    (dict(impl="triton"), ValueError, "`impl` must be one of"),
    (dict(shift=SEQ_LEN + 1), ValueError, "`shift` must be in"),
    (dict(classifier_layout="dv"), ValueError, "classifier_layout='vd'"),
    (dict(block_sizes=(8, 32)), TypeError, "`block_sizes` must be a cce_jax.BlockSizes"),
    (dict(bias=jnp.zeros((NUM_CLASSES + 1,))), ValueError, "`bias` must have shape"),
    (dict(vocab_axis="tensor"), ValueError, "`vocab_axis`='tensor' is not a mesh axis"),
  ],
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
  e, c, labels, _ = _inputs(94)
  kwargs = {"labels": labels, **kwargs}
  with pytest.raises(error, match=match):
    cce_jax.token_stats(e, c, **kwargs)


def test_pallas_tpu_refuses_more_classes_than_its_f32_argmax_holds():
  """The TPU kernel carries the argmax as f32: exact below 2**24 classes per device."""
  e = jax.ShapeDtypeStruct((8, 128), jnp.bfloat16)
  c = jax.ShapeDtypeStruct((2**24 + 1, 128), jnp.bfloat16)
  call = lambda e, c: cce_jax.token_stats(e, c, impl="pallas_tpu", interpret=True)
  with pytest.raises(ValueError, match=r"impl='pallas_tpu' token statistics take at most 16777216"):
    jax.eval_shape(call, e, c)


@pytest.mark.parametrize("num_classes", [203, 4099])
def test_softcap_argmax_with_default_tiles(num_classes):
  """With a softcap and the default tiles (one tile wider than V at V = 203), the argmax is
  a class id in [0, V) holding the largest capped logit of the float64 reference. (It once
  compared the tile's maximum and its logits computed in two fusions that rounded tanh apart,
  matched no column, and returned V.)"""
  rng = np.random.default_rng(num_classes)
  e = rng.normal(size=(2, 13, 16)).astype(np.float32)
  c = rng.normal(size=(num_classes, 16)).astype(np.float32)
  stats = cce_jax.token_stats(jnp.asarray(e), jnp.asarray(c), softcap=3.0)
  expected = stats64.stats(e, c, softcap=3.0)
  assert int(np.max(stats.argmax)) < num_classes, "argmax out of range"
  _check_argmax("argmax", stats.argmax, expected["z"], atol=1e-5)
  assert_rel_close("entropy", stats.entropy, expected["entropy"], 2e-4)
