"""``linear_cross_entropy(..., grad_in_forward=True)``: the gradient computed in the forward.

Against the float64 reference on the option matrix's cases that apply (reductions "mean" and
"sum", no ``return_lse``; ragged sizes, f32/bf16/f16, both layouts, weights), with filtering
equal to the four-pass path's, and every case where it cannot apply: a clear error, never a
wrong gradient.
"""

from __future__ import annotations

import zlib

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
from testing import (
  PAIRWISE,
  SINGLE_OPTION,
  assert_rel_close,
  case_id,
  check_case,
)

import cce_jax
from cce_jax import grad_in_forward, synthetic

APPLICABLE = [
  case
  for case in {case_id(c): c for c in SINGLE_OPTION + PAIRWISE}.values()
  if case["reduction"] != "none" and not case["return_lse"]
]
N, D, V = 203, 40, 517  # ragged against the 64 x 128 tiles below
BLOCKS = cce_jax.BlockSizes(token_block=64, vocab_block=128)


@pytest.mark.parametrize("case", APPLICABLE, ids=[case_id(c) for c in APPLICABLE])
def test_matches_float64_reference(case):
  check_case("xla", case, seed=zlib.crc32(case_id(case).encode()) + 17, grad_in_forward=True)


def test_matrix_covers_what_the_issue_lists():
  seen = lambda name: {case[name] for case in APPLICABLE}
  assert seen("dtype") >= {"float32", "bfloat16"}
  assert seen("reduction") == {"mean", "sum"}
  for name, values in {
    "bias": {False, True},
    "softcap": {None, 4.0},
    "shift": {0, 1, 2},
    "z_loss": {0.0, 0.05},
    "label_smoothing": {0.0, 0.2},
    "ignored": {"none", "some", "all"},
    "classifier_layout": {"vd", "dv"},
    "weights": {"none", "float", "bool"},
  }.items():
    assert seen(name) == values, name


def _inputs(dtype, seed: int, trained: bool):
  key = jax.random.key(seed)
  if trained:
    e, c, labels = synthetic.trained_like_inputs(key, N, D, V, dtype=dtype)
  else:
    e, c, labels = synthetic.uniform_inputs(key, N, D, V, dtype=dtype)
  labels = labels.at[::7].set(-100)
  bias = jax.random.normal(jax.random.fold_in(key, 1), (V,), jnp.float32)
  return e, c, labels, bias


SLOW = pytest.mark.slow


def _value_and_grads(fused: bool, e, c, labels, bias, **options):
  def loss(e, c, bias):
    return cce_jax.linear_cross_entropy(
      e, c, labels, bias=bias, block_sizes=BLOCKS, grad_in_forward=fused, **options
    )

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(e, c, bias)


@pytest.mark.parametrize(
  ("dtype", "trained", "options"),
  [
    ("float32", False, {"filter_eps": 0.1}),
    # Unsorted, a tile skips only without targets in it: most tokens ignored here.
    ("float32", True, {"filter_eps": 1e-2, "sort_vocab": False, "reduction": "sum", "keep": 64}),
    pytest.param(
      "float32", True, {"filter_eps": 1e-3, "filter_c_grad": False, "z_loss": 1e-3}, marks=SLOW
    ),
    pytest.param(
      "float32",
      True,
      {"filter_eps": 1e-3, "filter_e_grad": False, "label_smoothing": 0.1},
      marks=SLOW,
    ),
    ("bfloat16", True, {}),  # "auto" filter_eps: 2**-12
    ("bfloat16", True, {"classifier_layout": "dv", "softcap": 30.0}),
  ],
)
def test_filtering_equals_four_pass(dtype, trained, options):
  """Same tiles, same skip rule: the filtered gradients equal the four-pass path's (to f32
  rounding), and the filtering really dropped something (they differ from exact)."""
  e, c, labels, bias = _inputs(dtype, zlib.crc32(repr(options).encode()), trained)
  options = dict(options)
  keep = options.pop("keep", 1)  # keep one token in `keep`, ignore the others
  labels = jnp.where(jnp.arange(N) % keep == 0, labels, -100)
  if options.get("classifier_layout") == "dv":
    c = c.T
  four = _value_and_grads(False, e, c, labels, bias, **options)
  fused = _value_and_grads(True, e, c, labels, bias, **options)
  exact = _value_and_grads(False, e, c, labels, bias, **{**options, "filter_eps": None})
  assert_rel_close("loss", fused[0], four[0], 1e-6)
  for name, got, want in zip(("d_e", "d_c", "d_bias"), fused[1], four[1], strict=True):
    chex.assert_trees_all_equal_dtypes(got, want)
    assert_rel_close(name, got, want, 1e-6 if dtype == "float32" else 4e-3)
  changed = [
    float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
    for a, b in zip(four[1], exact[1], strict=True)
  ]
  assert max(changed) > 0.0, "filtering skipped nothing: the comparison tests nothing"


def test_skipped_tiles_equal_four_pass_bitwise():
  """bfloat16 trained-like inputs, "sum" (cotangent 1): a fifth or more of the tiles are
  skipped, and the fused forward's gradients equal the four-pass backward's bit for bit."""
  e, c, labels, bias = _inputs("bfloat16", 3, trained=True)
  stats = cce_jax.filter_stats(e, c, labels, bias=bias, block_sizes=BLOCKS)
  assert float(stats["skipped_fraction"]) > 0.2
  four = _value_and_grads(False, e, c, labels, bias, reduction="sum")
  fused = _value_and_grads(True, e, c, labels, bias, reduction="sum")
  for got, want in zip(fused[1], four[1], strict=True):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_skipped_tiles_cost_no_branch():
  """With both products filtered, the second sweep loops over the list of kept tiles: the
  compiled step holds no per-tile branch (the four-pass backward's lax.cond) and no work for
  a skipped tile; the filtered gradients are checked against the four-pass path above."""
  e, c, labels, _ = _inputs("bfloat16", 3, trained=True)

  def compiled(fused):
    loss = lambda e, c: cce_jax.linear_cross_entropy(
      e, c, labels, block_sizes=BLOCKS, grad_in_forward=fused, reduction="sum"
    )
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(e, c).compile().as_text()

  # The compiled program: branches on a constant (lax.platform_dependent in the sort) are
  # folded away there, a branch on data is not.
  assert " conditional(" in compiled(False)  # the four-pass backward's per-tile branch
  assert " conditional(" not in compiled(True)


def test_default_tiles_bound_the_logits_buffer():
  base = cce_jax.BlockSizes(token_block=1024, vocab_block=2048)
  assert grad_in_forward.default_block_sizes(base, 256_000).token_block == 64
  assert grad_in_forward.default_block_sizes(base, 32_768).token_block == 512
  assert grad_in_forward.default_block_sizes(base, 1000) == base
  assert grad_in_forward.default_block_sizes(base, 10**8).token_block == 8


@pytest.mark.slow
def test_default_tiles_match_the_reference_when_v_forces_small_blocks():
  """V large enough that the default token block drops to 8 rows (ragged N)."""
  rng = np.random.default_rng(5)
  num_classes = grad_in_forward.ROW_BUFFER_BYTES // (4 * 8) + 37  # -> 8-row token blocks
  e = jnp.asarray(rng.normal(size=(19, 4)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(num_classes, 4)) * 0.3, jnp.float32)
  labels = jnp.asarray(rng.integers(0, num_classes, size=(19,)), jnp.int32)
  options = dict(ignore_index=-100, softcap=None, shift=0, z_loss=0.0, label_smoothing=0.0)
  expected = reference64.reference(
    e, c, labels, None, reduction="mean", classifier_layout="vd", **options
  )
  loss_fn = lambda e, c: cce_jax.linear_cross_entropy(
    e, c, labels, grad_in_forward=True, filter_eps=None
  )
  value, (d_e, d_c) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(e, c)
  assert_rel_close("loss", value, expected["loss"], 2e-5)
  assert_rel_close("d_e", d_e, expected["d_e"], 2e-5)
  assert_rel_close("d_c", d_c, expected["d_c"], 2e-5)


# ---- where it cannot apply --------------------------------------------------------------------


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"reduction": "none"}, "`reduction` must be"),
    ({"return_lse": True}, "`return_lse=True`"),
    ({"vocab_axis": "tensor"}, "`vocab_axis`="),
    ({"impl": "reference"}, "`impl`='reference'"),
    ({"impl": "pallas_gpu", "interpret": True}, "`impl`='pallas_gpu'"),
    ({"impl": "pallas_tpu", "interpret": True}, "`impl`='pallas_tpu'"),
  ],
)
def test_conflicting_arguments_raise(kwargs, match):
  e, c, labels, _ = _inputs("float32", 0, trained=False)
  with pytest.raises(ValueError, match=match):
    cce_jax.linear_cross_entropy(e, c, labels, grad_in_forward=True, **kwargs)


def test_grad_in_forward_must_be_a_bool():
  e, c, labels, _ = _inputs("float32", 0, trained=False)
  with pytest.raises(TypeError, match="`grad_in_forward`"):
    cce_jax.linear_cross_entropy(e, c, labels, grad_in_forward="yes")


def test_vmap_gradient_raises_and_value_works():
  e, c, labels, _ = _inputs("float32", 1, trained=False)
  e3, labels3 = e[:201].reshape(3, 67, D), labels[:201].reshape(3, 67)
  loss = lambda e, labels: cce_jax.linear_cross_entropy(
    e, c, labels, grad_in_forward=True, block_sizes=BLOCKS
  )
  values = jax.vmap(loss)(e3, labels3)
  plain = jax.vmap(lambda e, y: cce_jax.linear_cross_entropy(e, c, y, block_sizes=BLOCKS))
  np.testing.assert_allclose(values, plain(e3, labels3), rtol=1e-6)
  with pytest.raises(ValueError, match=r"jax\.vmap"):
    jax.vmap(jax.grad(loss))(e3, labels3)


def test_second_order_raises():
  e, c, labels, _ = _inputs("float32", 2, trained=False)
  loss = lambda e: cce_jax.linear_cross_entropy(e[:20], c, labels[:20], grad_in_forward=True)
  with pytest.raises(NotImplementedError, match="first-order"):
    jax.grad(lambda e: jnp.sum(jax.grad(loss)(e) ** 2))(e)


def _buffers_in(fn, *args) -> int:
  """How many loops carry an f32 (token_block, V) logits buffer in ``fn``'s jaxpr."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  count = 0

  def walk(jaxpr):
    nonlocal count
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("while", "scan"):
        shapes = [tuple(v.aval.shape) for v in eqn.outvars]
        count += (BLOCKS.token_block, V) in shapes
    for sub in jax.extend.core.subjaxprs(jaxpr):
      walk(sub)

  walk(jaxpr.jaxpr)
  return count


def test_checkpoint_recomputes_the_forward_gradient():
  """Under jax.checkpoint the fused forward (gradient included) runs twice: the gradient is
  right, and the jaxpr holds two logits-buffer loops where it holds one without it."""
  e, c, labels, _ = _inputs("float32", 4, trained=False)

  def loss(e, c):
    return cce_jax.linear_cross_entropy(
      e, c, labels, grad_in_forward=True, block_sizes=BLOCKS, filter_eps=None
    )

  plain = jax.grad(loss, argnums=(0, 1))
  remat = jax.grad(jax.checkpoint(loss), argnums=(0, 1))
  for got, want in zip(jax.jit(remat)(e, c), jax.jit(plain)(e, c), strict=True):
    assert_rel_close("grad", got, want, 1e-6)
  assert _buffers_in(plain, e, c) == 1
  assert _buffers_in(remat, e, c) == 2
  assert _buffers_in(loss, e, c) == 0  # not differentiated: the ordinary forward only


def test_sum_gradient_scales_with_the_cotangent():
  """The backward multiplies the forward's gradient by the cotangent (here -2.5)."""
  e, c, labels, _ = _inputs("float32", 6, trained=False)

  def loss(fused, e):
    return cce_jax.linear_cross_entropy(
      e, c, labels, reduction="sum", grad_in_forward=fused, block_sizes=BLOCKS
    )

  got = jax.vjp(lambda e: loss(True, e), e)[1](jnp.float32(-2.5))[0]
  want = jax.vjp(lambda e: loss(False, e), e)[1](jnp.float32(-2.5))[0]
  assert_rel_close("d_e", got, want, 1e-6)
