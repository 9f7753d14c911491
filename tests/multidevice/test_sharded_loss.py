"""Token- and vocabulary-parallel loss on 8 CPU devices equals the unsharded loss.

Run through tests/test_multidevice.py (which forces 8 host devices). Every sharded mode is
compared with the same implementation unsharded (itself checked against the float64 reference
by tests/test_option_matrix.py), for loss, lse and the gradients of e, c and bias.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from testing import (
  DEFAULT_CASE,
  PAIRWISE,
  SMALL_BLOCKS,
  assert_rel_close,
  case_id,
  make_inputs,
  make_weights,
)

import cce_jax
import cce_jax.synthetic

assert jax.device_count() == 8, "run through tests/test_multidevice.py"

# B = 4 sequences (2 x 2 token shards) of 13 tokens, V = 76 classes (4 vocabulary shards of 19,
# not a multiple of the 32-class tiles).
BATCH, NUM_CLASSES = 4, 76
AXES = ("data", "fsdp", "tensor")
MODES = {
  # name: (token_axes, vocab_axis)
  "token": (("data", "fsdp"), None),
  "vocab": (None, "tensor"),
  "token+vocab": (("data", "fsdp"), "tensor"),
  "token+vocab2": ("data", ("fsdp", "tensor")),
}
F32_TOL, BF16_TOL = 2e-5, 1.5e-2
# f32 cases cover every pair of option values except dtype; one bf16 and one f16 case.
CASES = list({case_id(c): c for c in ({**c, "dtype": "float32"} for c in PAIRWISE)}.values())
CASES += [
  {**DEFAULT_CASE, "dtype": "bfloat16", "bias": True, "shift": 1, "weights": "float"},
  {**DEFAULT_CASE, "dtype": "float16", "label_smoothing": 0.2, "z_loss": 0.05},
]


def mesh_of(axis_type=AxisType.Explicit) -> jax.sharding.Mesh:
  return jax.make_mesh((2, 2, 2), AXES, axis_types=(axis_type,) * 3)


def loss_and_grads(case, inputs, **sharding):
  """Outputs and gradients w.r.t. (e, c, bias, float per-token weights of the case)."""
  e, c, labels, bias, loss_weights, lse_weights = inputs
  options = {
    k: case[k]
    for k in (
      "ignore_index",
      "softcap",
      "reduction",
      "shift",
      "z_loss",
      "label_smoothing",
      "classifier_layout",
      "return_lse",
      "sort_vocab",
    )
  }
  weights = make_weights(zlib.crc32(case_id(case).encode()), case, batch=e.shape[0])
  float_weights = weights if weights is not None and weights.dtype != jnp.bool_ else None

  def objective(e, c, bias, float_weights):
    out = cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      bias=bias,
      filter_eps=None,
      block_sizes=SMALL_BLOCKS,
      **options,
      weights=weights if float_weights is None else float_weights,
      **sharding,
    )
    loss, lse = out if case["return_lse"] else (out, None)
    lw = None if loss_weights is None else jnp.asarray(loss_weights, jnp.float32)
    hw = None if lse_weights is None else jnp.asarray(lse_weights, jnp.float32)
    return reference64.objective(loss, lse, lw, hw), (loss, lse)

  (_, outputs), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2, 3), has_aux=True))(
    e, c, bias, float_weights
  )
  return outputs, grads


def assert_same(case, actual, expected):
  (loss, lse), grads = actual
  (loss_ref, lse_ref), grads_ref = expected
  tol = {"float32": F32_TOL}.get(case["dtype"], BF16_TOL)
  assert_rel_close("loss", loss, loss_ref, F32_TOL if case["dtype"] == "float32" else 1e-3)
  if lse is not None:
    assert_rel_close("lse", lse, lse_ref, F32_TOL)
  for name, g, g_ref in zip(("d_e", "d_c", "d_bias", "d_weights"), grads, grads_ref, strict=True):
    if g_ref is not None:
      assert g.dtype == g_ref.dtype, name
      assert_rel_close(name, g, g_ref, tol)


def _mode_cases():
  """Every other case (and the last but one) in the combined mode; the other modes get two
  cases; --runslow runs every case in every mode."""
  for mode in MODES:
    for i, case in enumerate(CASES):
      default = i in (0, len(CASES) - 2) or (mode == "token+vocab" and i % 2 == 0)
      marks = () if default else pytest.mark.slow
      yield pytest.param(mode, case, id=f"{mode}-{case_id(case)}", marks=marks)


@pytest.mark.parametrize(("mode", "case"), list(_mode_cases()))
def test_sharded_equals_unsharded(mode, case):
  inputs = make_inputs(
    zlib.crc32(case_id(case).encode()), case, batch=BATCH, num_classes=NUM_CLASSES
  )
  token_axes, vocab_axis = MODES[mode]
  expected = loss_and_grads(case, inputs)
  actual = loss_and_grads(
    case, inputs, mesh=mesh_of(), token_axes=token_axes, vocab_axis=vocab_axis
  )
  assert_same(case, actual, expected)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_auto_and_explicit_meshes(axis_type):
  case = {**DEFAULT_CASE, "bias": True, "label_smoothing": 0.2, "shift": 1}
  inputs = make_inputs(7, case, batch=BATCH, num_classes=NUM_CLASSES)
  expected = loss_and_grads(case, inputs)
  actual = loss_and_grads(
    case, inputs, mesh=mesh_of(axis_type), token_axes=("data", "fsdp"), vocab_axis="tensor"
  )
  assert_same(case, actual, expected)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inside_users_shard_map(check_vma, reduction):
  """vocab_axis inside the user's shard_map: loss AND gradients, check_vma on and off."""
  case = {
    **DEFAULT_CASE,
    "bias": True,
    "z_loss": 0.05,
    "label_smoothing": 0.2,
    "ignored": "some",
    "reduction": reduction,
    "shift": 1,
  }
  e, c, labels, bias, loss_weights, _ = make_inputs(11, case, batch=BATCH, num_classes=NUM_CLASSES)
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
  options = dict(
    shift=1,
    z_loss=0.05,
    label_smoothing=0.2,
    filter_eps=None,
    block_sizes=SMALL_BLOCKS,
    reduction=reduction,
  )
  weights = None if loss_weights is None else jnp.asarray(loss_weights, jnp.float32)

  def per_device(e, c, bias, labels, weights):
    loss = cce_jax.linear_cross_entropy(
      e, c, labels, bias=bias, vocab_axis="tensor", token_axes="data", **options
    )
    return loss if weights is None else jax.lax.psum(jnp.sum(loss * weights), "data")

  specs = (P("data"), P("tensor"), P("tensor"), P("data"), None if weights is None else P("data"))
  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check_vma)

  def sharded_objective(e, c, bias):
    return sharded(e, c, bias, labels, weights)

  def objective(e, c, bias):
    loss = cce_jax.linear_cross_entropy(e, c, labels, bias=bias, **options)
    return loss if weights is None else jnp.sum(loss * weights)

  actual = jax.jit(jax.value_and_grad(sharded_objective, argnums=(0, 1, 2)))(e, c, bias)
  expected = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2)))(e, c, bias)
  assert_rel_close("loss", actual[0], expected[0], F32_TOL)
  for name, g, g_ref in zip(("d_e", "d_c", "d_bias"), actual[1], expected[1], strict=True):
    assert_rel_close(name, g, g_ref, F32_TOL)


@pytest.mark.parametrize("check_vma", [True, False])
def test_weighted_mean_inside_users_shard_map(check_vma):
  """Per-token weights split with the tokens: the mean divides by the global weight sum, and
  the weights get their gradient, with check_vma on and off."""
  case = {**DEFAULT_CASE, "bias": True, "ignored": "some", "shift": 1, "weights": "float"}
  e, c, labels, bias, *_ = make_inputs(17, case, batch=BATCH, num_classes=NUM_CLASSES)
  weights = make_weights(17, case, batch=BATCH)
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
  options = dict(shift=1, filter_eps=None, block_sizes=SMALL_BLOCKS)

  def per_device(e, c, bias, labels, weights):
    return cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      bias=bias,
      weights=weights,
      vocab_axis="tensor",
      token_axes="data",
      **options,
    )

  specs = (P("data"), P("tensor"), P("tensor"), P("data"), P("data"))
  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=check_vma)
  actual = jax.jit(
    jax.value_and_grad(lambda e, c, bias, w: sharded(e, c, bias, labels, w), argnums=(0, 1, 2, 3))
  )(e, c, bias, weights)
  expected = jax.jit(
    jax.value_and_grad(
      lambda e, c, bias, w: cce_jax.linear_cross_entropy(
        e, c, labels, bias=bias, weights=w, **options
      ),
      argnums=(0, 1, 2, 3),
    )
  )(e, c, bias, weights)
  assert_rel_close("loss", actual[0], expected[0], F32_TOL)
  for name, g, g_ref in zip(
    ("d_e", "d_c", "d_bias", "d_weights"), actual[1], expected[1], strict=True
  ):
    assert_rel_close(name, g, g_ref, F32_TOL)


def test_mean_counts_tokens_globally():
  """One shard with every token ignored: the mean is over the global count, not per shard."""
  case = {**DEFAULT_CASE, "ignored": "some"}
  e, c, labels, *_ = make_inputs(3, case, batch=BATCH, num_classes=NUM_CLASSES)
  labels = labels.at[:2].set(case["ignore_index"])  # the first data shard has no token
  expected = cce_jax.linear_cross_entropy(e, c, labels)
  actual = jax.jit(
    lambda e, c: cce_jax.linear_cross_entropy(e, c, labels, mesh=mesh_of(), token_axes="data")
  )(e, c)
  assert_rel_close("loss", actual, expected, F32_TOL)


def test_per_token_output_is_sharded_like_the_tokens():
  case = {**DEFAULT_CASE, "reduction": "none"}
  e, c, labels, *_ = make_inputs(5, case, batch=BATCH, num_classes=NUM_CLASSES)
  mesh = mesh_of()
  loss, lse = jax.jit(
    lambda e, c: cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      reduction="none",
      return_lse=True,
      mesh=mesh,
      token_axes=("data", "fsdp"),
      vocab_axis="tensor",
    )
  )(e, c)
  assert loss.sharding.spec[0] == ("data", "fsdp") and lse.sharding.spec[0] == ("data", "fsdp")


def test_bad_labels_poison_sharded_loss_and_gradients():
  e, c, labels, *_ = make_inputs(9, DEFAULT_CASE, batch=BATCH, num_classes=NUM_CLASSES)
  labels = labels.at[3, 4].set(NUM_CLASSES)
  loss, (d_e, d_c) = jax.jit(
    jax.value_and_grad(
      lambda e, c: cce_jax.linear_cross_entropy(
        e, c, labels, mesh=mesh_of(), token_axes="data", vocab_axis="tensor"
      ),
      argnums=(0, 1),
    )
  )(e, c)
  d_e, d_c = np.asarray(d_e), np.asarray(d_c)
  assert np.isnan(loss) and np.isnan(d_e[3, 4]).all() and np.isnan(d_c).any()
  assert np.isfinite(d_e[:3]).all()


def test_filtering_per_shard_matches_unsharded():
  """With filtering on, each vocabulary shard skips by the same rule: the results agree."""
  inputs = cce_jax.synthetic.trained_like_inputs(jax.random.key(0), 64, 32, 256, jnp.float32)
  e, c, labels = inputs[:3]
  e = e.reshape(4, 16, 32)
  labels = labels.reshape(4, 16)
  options = dict(filter_eps=1e-3, block_sizes=cce_jax.BlockSizes(8, 16))

  def grads(**sharding):
    return jax.jit(
      jax.grad(
        lambda e, c: cce_jax.linear_cross_entropy(e, c, labels, **options, **sharding),
        argnums=(0, 1),
      )
    )(e, c)

  skipped = cce_jax.filter_stats(e, c, labels, **options)["skipped_fraction"]
  assert 0.2 < skipped < 1.0, skipped  # filtering really drops work here
  expected = grads()
  exact = jax.grad(lambda e: cce_jax.linear_cross_entropy(e, c, labels, filter_eps=None))(e)
  assert not np.allclose(expected[0], exact, rtol=0, atol=0)
  actual = grads(mesh=mesh_of(), token_axes=("data", "fsdp"), vocab_axis="tensor")
  # Tiles are cut per shard and sorted per shard, so a few borderline tiles may differ: each
  # skipped entry is below eps, so the difference is small against the gradient.
  for g, g_ref in zip(actual, expected, strict=True):
    assert_rel_close("grad", g, g_ref, 5e-3)


# ---- errors -----------------------------------------------------------------------------------


def _small():
  e, c, labels, *_ = make_inputs(1, DEFAULT_CASE, batch=BATCH, num_classes=NUM_CLASSES)
  return e, c, labels


@pytest.mark.parametrize(
  ("kwargs", "error", "match"),
  [
    ({"token_axes": "batch"}, ValueError, r"`token_axes` names \['batch'\]"),
    ({"vocab_axis": "model"}, ValueError, r"`vocab_axis` names \['model'\]"),
    ({"token_axes": "data", "vocab_axis": "data"}, ValueError, "must not share"),
    ({"vocab_axis": 3}, TypeError, "`vocab_axis` must be a mesh axis name"),
    ({"mesh": "mesh", "vocab_axis": "tensor"}, TypeError, "`mesh` must be a"),
  ],
)
def test_mesh_argument_errors(kwargs, error, match):
  e, c, labels = _small()
  kwargs = {"mesh": mesh_of(), **kwargs}
  with pytest.raises(error, match=match):
    cce_jax.linear_cross_entropy(e, c, labels, **kwargs)


def test_vocabulary_not_divisible():
  e, c, labels = _small()
  with pytest.raises(ValueError, match=r"V=75 .* divisible by the 2 devices of `vocab_axis`"):
    cce_jax.linear_cross_entropy(e, c[:75], labels % 75, mesh=mesh_of(), vocab_axis="tensor")


def test_tokens_not_divisible():
  e, c, labels = _small()
  with pytest.raises(ValueError, match=r"leading axis \(3\) must be divisible by the 4 devices"):
    cce_jax.linear_cross_entropy(e[:3], c, labels[:3], mesh=mesh_of(), token_axes=("data", "fsdp"))


def test_shift_across_token_shards():
  e, c, labels = _small()
  with pytest.raises(ValueError, match="would shift across shards"):
    cce_jax.linear_cross_entropy(
      e.reshape(-1, e.shape[-1]), c, labels.reshape(-1), shift=1, mesh=mesh_of(), token_axes="data"
    )


def test_labels_sharded_unlike_tokens():
  e, c, labels = _small()
  mesh = mesh_of()
  e = jax.device_put(e, jax.sharding.NamedSharding(mesh, P("data")))
  labels = jax.device_put(labels, jax.sharding.NamedSharding(mesh, P("fsdp")))
  with pytest.raises(ValueError, match="`labels` must be sharded like the tokens"):
    cce_jax.linear_cross_entropy(e, c, labels, mesh=mesh, token_axes="data")


def test_vocab_axis_outside_shard_map():
  e, c, labels = _small()
  with pytest.raises(ValueError, match="`vocab_axis`='tensor' is not a mesh axis of an enclosing"):
    cce_jax.linear_cross_entropy(e, c, labels, vocab_axis="tensor")


# ---- memory -----------------------------------------------------------------------------------


def test_vocab_parallel_temporaries_below_one_classifier_copy():
  """Gemma-2-like head (V=256000, D=2304), N=8192, mesh (data=2, tensor=4): compiled, not run.

  float32, whose matrix products XLA:CPU runs natively: for bfloat16 it converts operands to
  f32 and keeps (V/4, D) f32 copies that GPUs and TPUs do not make (benchmarks/memory.py).
  """
  num_tokens, hidden, num_classes = 8192, 2304, 256000
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
  placed = lambda shape, dtype, spec: jax.ShapeDtypeStruct(
    shape, dtype, sharding=jax.sharding.NamedSharding(mesh, spec)
  )
  e = placed((num_tokens, hidden), jnp.float32, P("data"))
  c = placed((num_classes, hidden), jnp.float32, P("tensor"))
  labels = placed((num_tokens,), jnp.int32, P("data"))

  def loss(e, c, labels):
    return cce_jax.linear_cross_entropy(
      e, c, labels, mesh=mesh, token_axes="data", vocab_axis="tensor"
    )

  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(e, c, labels).compile()
  stats = compiled.memory_analysis()
  full_classifier = num_classes * hidden * 4
  assert stats.argument_size_in_bytes < full_classifier / 3  # this device's quarter of c
  assert stats.temp_size_in_bytes < full_classifier, stats.temp_size_in_bytes


# ---- Pallas implementations (interpret mode) ----------------------------------------------------


def _pallas_blocks(impl: str):
  if impl == "pallas_gpu":
    from pallas_kernels.gpu import GPUBlockSizes

    return GPUBlockSizes(token_block=16, vocab_block=32, hidden_block=16)
  from pallas_kernels.tpu import TPUBlockSizes

  return TPUBlockSizes(token_block=128, vocab_block=128, hidden_block=128)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_under_mesh_and_users_shard_map(impl):
  """mesh= (token + vocabulary parallel) and a user's shard_map with check_vma=False equal the
  unsharded xla result, loss and gradients (interpret mode, small ragged shapes, per-token
  weights)."""
  case = {
    **DEFAULT_CASE,
    "bias": True,
    "label_smoothing": 0.2,
    "z_loss": 0.05,
    "ignored": "some",
    "shift": 1,
  }
  e, c, labels, bias, *_ = make_inputs(13, case, batch=BATCH, num_classes=NUM_CLASSES)
  weights = make_weights(13, {**case, "weights": "float"}, batch=BATCH)
  options = dict(shift=1, z_loss=0.05, label_smoothing=0.2, filter_eps=None)
  pallas = dict(impl=impl, interpret=True, block_sizes=_pallas_blocks(impl), **options)

  def loss_fn(**extra):
    return jax.jit(
      jax.value_and_grad(
        lambda e, c, bias: cce_jax.linear_cross_entropy(
          e, c, labels, bias=bias, weights=weights, **extra
        ),
        argnums=(0, 1, 2),
      )
    )

  expected = loss_fn(block_sizes=SMALL_BLOCKS, **options)(e, c, bias)
  mesh = mesh_of()
  by_mesh = loss_fn(mesh=mesh, token_axes=("data", "fsdp"), vocab_axis="tensor", **pallas)
  mesh2 = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
  in_users = jax.shard_map(
    lambda e, c, bias, labels, weights: cce_jax.linear_cross_entropy(
      e, c, labels, bias=bias, weights=weights, vocab_axis="tensor", token_axes="data", **pallas
    ),
    mesh=mesh2,
    in_specs=(P("data"), P("tensor"), P("tensor"), P("data"), P("data")),
    out_specs=P(),
    check_vma=False,
  )
  by_user = jax.jit(
    jax.value_and_grad(lambda e, c, bias: in_users(e, c, bias, labels, weights), argnums=(0, 1, 2))
  )
  for actual in (by_mesh(e, c, bias), by_user(e, c, bias)):
    assert_rel_close("loss", actual[0], expected[0], F32_TOL)
    for name, g, g_ref in zip(("d_e", "d_c", "d_bias"), actual[1], expected[1], strict=True):
      assert_rel_close(name, g, g_ref, F32_TOL)
