"""jit, grad, vmap (the fold into the token axis) and checkpoint, against the f64 reference."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
from testing import assert_rel_close

import cce_jax

BLOCKS = cce_jax.BlockSizes(token_block=8, vocab_block=32)
BATCH, SEQ_LEN, HIDDEN, NUM_CLASSES = 3, 11, 16, 70
REF_OPTIONS = dict(
  ignore_index=-100, softcap=None, shift=1, z_loss=0.0, label_smoothing=0.0, classifier_layout="vd"
)


@pytest.fixture
def inputs():
  rng = np.random.default_rng(7)
  e = jnp.asarray(rng.normal(size=(BATCH, SEQ_LEN, HIDDEN)) + 0.3, jnp.float32)
  c = jnp.asarray(rng.normal(size=(NUM_CLASSES, HIDDEN)) * 0.5, jnp.float32)
  labels = rng.integers(0, NUM_CLASSES, size=(BATCH, SEQ_LEN)).astype(np.int32)
  labels[0, 3] = -100
  return e, c, jnp.asarray(labels)


def loss_fn(e, c, labels, **options):
  return cce_jax.linear_cross_entropy(
    e, c, labels, shift=1, block_sizes=BLOCKS, filter_eps=None, **options
  )


def _equations(jaxpr):
  yield from jaxpr.eqns
  for sub in jax.extend.core.subjaxprs(jaxpr):
    yield from _equations(sub)


def test_vmap_folds_the_batch_into_the_tokens(inputs):
  e, c, labels = inputs
  per_example = jax.vmap(loss_fn, in_axes=(0, None, 0))(e, c, labels)
  for b in range(BATCH):
    want = reference64.reference(e[b], c, labels[b], None, reduction="mean", **REF_OPTIONS)
    assert_rel_close(f"loss[{b}]", per_example[b], want["loss"], 2e-6)
  # The fold: every matmul of the vmapped forward is a plain 2-D one (no batch dimension).
  jaxpr = jax.make_jaxpr(jax.vmap(loss_fn, in_axes=(0, None, 0)))(e, c, labels).jaxpr
  dots = [q for q in _equations(jaxpr) if q.primitive.name == "dot_general"]
  assert dots and all(q.params["dimension_numbers"][1] == ((), ()) for q in dots)


def test_grad_of_vmap_and_vmap_of_grad(inputs):
  e, c, labels = inputs
  total = lambda e, c: jnp.sum(jax.vmap(loss_fn, in_axes=(0, None, 0))(e, c, labels))
  d_e, d_c = jax.jit(jax.grad(total, argnums=(0, 1)))(e, c)
  per_example_grads = jax.vmap(jax.grad(loss_fn, argnums=(0, 1)), in_axes=(0, None, 0))
  d_e_each, d_c_each = jax.jit(per_example_grads)(e, c, labels)
  assert d_c_each.shape == (BATCH, NUM_CLASSES, HIDDEN)
  d_c_sum = np.zeros((NUM_CLASSES, HIDDEN))
  for b in range(BATCH):
    want = reference64.reference(e[b], c, labels[b], None, reduction="mean", **REF_OPTIONS)
    assert_rel_close(f"d_e[{b}]", d_e[b], want["d_e"], 2e-5)
    assert_rel_close(f"vmap(grad) d_e[{b}]", d_e_each[b], want["d_e"], 2e-5)
    assert_rel_close(f"vmap(grad) d_c[{b}]", d_c_each[b], want["d_c"], 2e-5)
    d_c_sum += want["d_c"]
  assert_rel_close("d_c", d_c, d_c_sum, 2e-5)


def test_filtering_still_skips_under_vmap(inputs):
  e, c, labels = inputs

  def total(e):
    per_example = jax.vmap(
      lambda e, y: cce_jax.linear_cross_entropy(e, c, y, block_sizes=BLOCKS, filter_eps=1e-3)
    )(e, labels)
    return jnp.sum(per_example)

  names = {q.primitive.name for q in _equations(jax.make_jaxpr(jax.grad(total))(e).jaxpr)}
  # A vmapped cond with a batched predicate would have become select_n of both branches.
  assert "cond" in names


def test_vmap_with_a_classifier_per_example(inputs):
  e, _, labels = inputs
  cs = jnp.asarray(np.random.default_rng(8).normal(size=(BATCH, NUM_CLASSES, HIDDEN)), jnp.float32)
  got = jax.vmap(loss_fn)(e, cs, labels)
  d_cs = jax.grad(lambda cs: jnp.sum(jax.vmap(loss_fn)(e, cs, labels)))(cs)
  for b in range(BATCH):
    want = reference64.reference(e[b], cs[b], labels[b], None, reduction="mean", **REF_OPTIONS)
    assert_rel_close(f"loss[{b}]", got[b], want["loss"], 2e-6)
    assert_rel_close(f"d_c[{b}]", d_cs[b], want["d_c"], 2e-5)


def test_nested_vmap(inputs):
  e, c, labels = inputs
  e4, labels4 = e.reshape(1, BATCH, SEQ_LEN, HIDDEN), labels.reshape(1, BATCH, SEQ_LEN)
  nested = jax.vmap(jax.vmap(loss_fn, in_axes=(0, None, 0)), in_axes=(0, None, 0))
  flat = jax.vmap(loss_fn, in_axes=(0, None, 0))
  np.testing.assert_allclose(nested(e4, c, labels4)[0], flat(e, c, labels), rtol=1e-6)


def test_checkpoint_and_bias_gradient(inputs):
  e, c, labels = inputs
  bias = jnp.asarray(np.random.default_rng(9).normal(size=(NUM_CLASSES,)), jnp.float32)
  plain = jax.grad(lambda e, c, b: loss_fn(e, c, labels, bias=b), argnums=(0, 1, 2))
  remat = jax.grad(jax.checkpoint(lambda e, c, b: loss_fn(e, c, labels, bias=b)), argnums=(0, 1, 2))
  want = reference64.reference(e, c, labels, bias, reduction="mean", **REF_OPTIONS)
  for name, got_plain, got_remat, ref in zip(
    ("d_e", "d_c", "d_bias"),
    plain(e, c, bias),
    jax.jit(remat)(e, c, bias),
    (want["d_e"], want["d_c"], want["d_bias"]),
    strict=True,
  ):
    assert_rel_close(name, got_plain, ref, 2e-5)
    assert_rel_close(f"checkpoint {name}", got_remat, ref, 2e-5)


def test_interpret_is_ignored_by_xla_inside_shard_map_with_check_vma(inputs):
  """``interpret`` means nothing to "xla": inside a check_vma=True shard_map it must neither
  raise the Pallas interpreter's error nor change the numbers."""
  e, c, labels = inputs
  mesh = jax.make_mesh(
    (1,), ("tokens",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1]
  )
  spec = jax.sharding.PartitionSpec("tokens")

  def per_device(e, c, labels, interpret):
    return loss_fn(e, c, labels, impl="xla", interpret=interpret, token_axes="tokens")

  def sharded(interpret):
    body = lambda e, c, labels: per_device(e, c, labels, interpret)
    mapped = jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(spec, jax.sharding.PartitionSpec(), spec),
      out_specs=jax.sharding.PartitionSpec(),
      check_vma=True,
    )
    return jax.jit(jax.value_and_grad(mapped, argnums=(0, 1)))(e, c, labels)

  loss, (d_e, d_c) = sharded(True)
  want = reference64.reference(e, c, labels, None, reduction="mean", **REF_OPTIONS)
  assert_rel_close("loss", loss, want["loss"], 2e-6)
  assert_rel_close("d_e", d_e, want["d_e"], 2e-5)
  assert_rel_close("d_c", d_c, want["d_c"], 2e-5)
  loss_plain, (d_e_plain, d_c_plain) = sharded(False)
  np.testing.assert_array_equal(np.asarray(loss), np.asarray(loss_plain))
  np.testing.assert_array_equal(np.asarray(d_e), np.asarray(d_e_plain))
  np.testing.assert_array_equal(np.asarray(d_c), np.asarray(d_c_plain))


def _second_order(name: str, loss):
  """Each way of asking for a derivative of the gradient of ``loss(e, c)``."""
  grad = jax.grad(loss, argnums=(0, 1))
  return {
    "hessian": lambda e, c: jax.hessian(loss)(e, c),
    "grad_of_grad": lambda e, c: jax.grad(lambda e, c: jnp.sum(grad(e, c)[0]))(e, c),
    "jacrev_of_grad": lambda e, c: jax.jacrev(grad)(e, c),
    "hvp": lambda e, c: jax.jvp(lambda e: grad(e, c)[0], (e,), (e,)),
    "grad_of_vjp": lambda e, c: jax.grad(lambda g: jnp.sum(jax.vjp(loss, e, c)[1](g)[0]))(1.0),
  }[name]


@pytest.mark.parametrize(
  "asked", ["hessian", "grad_of_grad", "jacrev_of_grad", "hvp", "grad_of_vjp"]
)
@pytest.mark.parametrize("impl", ["xla", "reference", "pallas_gpu", "pallas_tpu"])
def test_second_order_derivatives_raise_plainly(inputs, impl, asked):
  """Only first-order reverse mode is supported: the rest says so (it used to fail with an
  empty AssertionError or "Linearization failed" from deep inside JAX)."""
  e, c, labels = inputs
  loss = lambda e, c: cce_jax.linear_cross_entropy(
    e, c, labels[0], impl=impl, interpret=impl.startswith("pallas")
  )
  with pytest.raises(
    NotImplementedError,
    match=r"first-order reverse-mode differentiation only .* derivative of its "
    r"gradient \(a second-order derivative: jax.hessian",
  ):
    _second_order(asked, loss)(e[0], c)
