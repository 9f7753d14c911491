"""``grad_in_forward=True`` on 8 CPU devices: token-parallel equals unsharded; a vocabulary
split raises naming ``vocab_axis``; a vocabulary axis of one device splits nothing.

Run through tests/test_multidevice.py (which forces 8 host devices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from testing import DEFAULT_CASE, SMALL_BLOCKS, assert_rel_close, make_inputs

import cce_jax

assert jax.device_count() == 8, "run through tests/test_multidevice.py"

BATCH, NUM_CLASSES = 8, 76
CASE = {**DEFAULT_CASE, "bias": True, "z_loss": 0.05, "ignored": "some", "shift": 1}


def _grads(inputs, **sharding):
  e, c, labels, bias, _, _ = inputs

  def loss(e, c, bias):
    return cce_jax.linear_cross_entropy(
      e, c, labels, bias=bias, shift=1, z_loss=0.05, block_sizes=SMALL_BLOCKS, **sharding
    )

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(e, c, bias)


@pytest.mark.parametrize("tensor", [1, 2])
def test_token_parallel_equals_unsharded(tensor):
  """Tokens over (data, fsdp); with tensor=1 the vocab axis of one device is dropped."""
  inputs = make_inputs(3, CASE, batch=BATCH, num_classes=NUM_CLASSES)
  mesh = jax.make_mesh(
    (8 // (2 * tensor), 2, tensor), ("data", "fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 3
  )
  vocab = {"vocab_axis": "tensor"} if tensor == 1 else {}
  expected = _grads(inputs)
  actual = _grads(inputs, mesh=mesh, token_axes=("data", "fsdp"), grad_in_forward=True, **vocab)
  assert_rel_close("loss", actual[0], expected[0], 2e-5)
  for name, g, g_ref in zip(("d_e", "d_c", "d_bias"), actual[1], expected[1], strict=True):
    assert_rel_close(name, g, g_ref, 2e-5)


@pytest.mark.parametrize("check_vma", [True, False])
def test_inside_users_shard_map(check_vma):
  inputs = make_inputs(4, CASE, batch=BATCH, num_classes=NUM_CLASSES)
  e, c, labels, bias, _, _ = inputs
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])

  def per_device(e, c, bias, labels):
    return cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      bias=bias,
      shift=1,
      z_loss=0.05,
      block_sizes=SMALL_BLOCKS,
      token_axes="data",
      grad_in_forward=True,
    )

  sharded = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(P("data"), P(), P(), P("data")),
    out_specs=P(),
    check_vma=check_vma,
  )
  actual = jax.jit(jax.value_and_grad(lambda e, c, b: sharded(e, c, b, labels), (0, 1, 2)))(
    e, c, bias
  )
  expected = _grads(inputs)
  assert_rel_close("loss", actual[0], expected[0], 2e-5)
  for name, g, g_ref in zip(("d_e", "d_c", "d_bias"), actual[1], expected[1], strict=True):
    assert_rel_close(name, g, g_ref, 2e-5)


def test_vocabulary_split_raises():
  e, c, labels, _, _, _ = make_inputs(5, CASE, batch=BATCH, num_classes=NUM_CLASSES)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Explicit,) * 3)
  with pytest.raises(ValueError, match="`vocab_axis`"):
    cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      mesh=mesh,
      token_axes=("data", "fsdp"),
      vocab_axis="tensor",
      grad_in_forward=True,
    )
  assert jnp.isfinite(
    cce_jax.linear_cross_entropy(
      e, c, labels, mesh=mesh, token_axes=("data", "fsdp"), vocab_axis="tensor"
    )
  )
