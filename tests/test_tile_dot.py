"""``cce_jax.tile_dot``: 16-bit tiles multiplied in float32 when compiling for CPU.

The upcast product against the native 16-bit product and the float64 product (ragged tiles,
bfloat16 and float16); the loss, its gradients (four-pass and ``grad_in_forward``) and the
token statistics with and without the upcast against the float64 references; and the lowering:
on CPU every tile product multiplies float32 operands, for GPU and TPU (abstract meshes, no
accelerator needed) every tile product keeps its bfloat16 operands.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
import stats64
from testing import assert_rel_close

import cce_jax
from cce_jax import tile_dot

NT = (((1,), (1,)), ((), ()))  # (n, D) x (v, D): the logits
NN = (((1,), (0,)), ((), ()))  # (n, v) x (v, D): dE
TN = (((0,), (0,)), ((), ()))  # (n, v) x (n, D): dC
SHAPES = {"NT": ((37, 129), (53, 129)), "NN": ((37, 53), (53, 129)), "TN": ((37, 53), (37, 129))}
DIMS = {"NT": NT, "NN": NN, "TN": TN}
N, D, V = 203, 40, 517  # ragged against the 64 x 128 tiles below
BLOCKS = cce_jax.BlockSizes(token_block=64, vocab_block=128)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("form", sorted(DIMS))
def test_upcast_product_equals_the_native_product(form, dtype):
  key_a, key_b = jax.random.split(jax.random.key(7))
  a = jax.random.normal(key_a, SHAPES[form][0], jnp.float32).astype(dtype)
  b = jax.random.normal(key_b, SHAPES[form][1], jnp.float32).astype(dtype)
  exact = np.asarray(
    jax.lax.dot_general(np.asarray(a, np.float64), np.asarray(b, np.float64), DIMS[form])
  )
  upcast = jax.jit(lambda a, b: tile_dot.tile_dot(a, b, DIMS[form], upcast=True))(a, b)
  native = jax.jit(lambda a, b: tile_dot.tile_dot(a, b, DIMS[form], upcast=False))(a, b)
  assert upcast.dtype == native.dtype == jnp.float32
  # Exact products, f32 accumulation of 53 or 129 terms: both within f32 rounding of float64.
  assert_rel_close("upcast", upcast, exact, 2e-6)
  assert_rel_close("native", native, exact, 2e-6)
  assert_rel_close("upcast vs native", upcast, np.asarray(native, np.float64), 4e-6)


def test_float32_operands_are_left_alone():
  a = jax.random.normal(jax.random.key(1), (5, 7), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (3, 7), jnp.float32)
  text = jax.jit(lambda a, b: tile_dot.tile_dot(a, b, NT, upcast=True)).lower(a, b).as_text()
  assert "convert" not in text


def _abstract_mesh(platform: str) -> jax.sharding.AbstractMesh:
  device = jax.sharding.AbstractDevice(device_kind="test", num_cores=1, platform=platform)
  return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)


def test_upcasts_16bit_follows_the_compile_target():
  x = jnp.ones((2, 2), jnp.bfloat16)
  assert tile_dot.upcasts_16bit(x) is (jax.default_backend() == "cpu")
  for platform in ("gpu", "tpu"):
    with jax.sharding.use_abstract_mesh(_abstract_mesh(platform)):
      assert tile_dot.upcasts_16bit(x) is False
  with jax.sharding.use_abstract_mesh(_abstract_mesh("cpu")):
    assert tile_dot.upcasts_16bit(x) is True


def _loss(grad_in_forward: bool):
  def loss(e, c, labels):
    return cce_jax.linear_cross_entropy(
      e, c, labels, impl="xla", block_sizes=BLOCKS, grad_in_forward=grad_in_forward
    )

  return loss


def _stats_objective(e, c, labels):
  stats = cce_jax.token_stats(e, c, labels, impl="xla", block_sizes=BLOCKS)
  return jnp.sum(stats.lse) + 0.5 * jnp.sum(stats.entropy)


PATHS = {
  "four_pass": _loss(False),
  "grad_in_forward": _loss(True),
  "token_stats": _stats_objective,
}


def _tile_dot_operands(fn, platform: str | None) -> list[str]:
  """The operand types of every tile product in the lowered loss+grad of ``fn`` (the matrix-
  vector product of the vocabulary sort, whose second operand is 1-D, left out)."""
  e = jax.ShapeDtypeStruct((N, D), jnp.bfloat16)
  c = jax.ShapeDtypeStruct((V, D), jnp.bfloat16)
  labels = jax.ShapeDtypeStruct((N,), jnp.int32)
  grad = jax.jit(jax.grad(fn, argnums=(0, 1)))
  if platform is None:
    text = grad.lower(e, c, labels).as_text()
  else:
    with jax.sharding.use_abstract_mesh(_abstract_mesh(platform)):
      text = grad.lower(e, c, labels).as_text()
  operands = [
    re.search(r": \((tensor<[^>]*>), (tensor<[^>]*>)\) ->", line).groups()
    for line in text.splitlines()
    if "stablehlo.dot_general" in line
  ]
  return [f"{a}, {b}" for a, b in operands if b.count("x") > 1]


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_gpu_and_tpu_lowerings_keep_bf16_tile_products(path, platform):
  operands = _tile_dot_operands(PATHS[path], platform)
  assert len(operands) >= 3  # the logits, dE and dC
  assert all(ops.count("xbf16>") == 2 for ops in operands), operands


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU lowering")
@pytest.mark.parametrize("path", sorted(PATHS))
def test_cpu_lowering_multiplies_bf16_tiles_in_f32(path):
  operands = _tile_dot_operands(PATHS[path], None)
  assert len(operands) >= 3
  assert all(ops.count("xf32>") == 2 for ops in operands), operands


def _inputs(seed: int):
  key_e, key_c, key_y = jax.random.split(jax.random.key(seed), 3)
  e = (jax.random.normal(key_e, (N, D), jnp.float32) * 0.7).astype(jnp.bfloat16)
  c = (jax.random.normal(key_c, (V, D), jnp.float32) * 0.5).astype(jnp.bfloat16)
  labels = jax.random.randint(key_y, (N,), 0, V, jnp.int32)
  return e, c, labels


def _grads(fn, e, c, labels, monkeypatch, upcast: bool):
  with monkeypatch.context() as patch:
    patch.setattr(tile_dot, "upcasts_16bit", lambda *arrays: upcast)
    value, (d_e, d_c) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(e, c, labels)
  as64 = lambda x: np.asarray(x, np.float64)
  return as64(value), as64(d_e), as64(d_c)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU upcast")
@pytest.mark.parametrize("grad_in_forward", [pytest.param(False, marks=pytest.mark.slow), True])
def test_loss_and_grads_with_the_upcast_match_float64(grad_in_forward, monkeypatch):
  e, c, labels = _inputs(11 + grad_in_forward)
  # Exact (no filtering) so that the two runs multiply the same tiles.
  fn = lambda e, c, y: cce_jax.linear_cross_entropy(
    e, c, y, impl="xla", block_sizes=BLOCKS, grad_in_forward=grad_in_forward, filter_eps=None
  )
  want = reference64.mean_reference(e, c, labels)
  upcast = _grads(fn, e, c, labels, monkeypatch, upcast=True)
  native = _grads(fn, e, c, labels, monkeypatch, upcast=False)
  for name, got in (("upcast", upcast), ("native", native)):
    assert_rel_close(f"{name} loss", got[0], want["loss"], 1e-6)
    # bf16 gradients (2**-8 rounding): the softmax gradient is rounded to bf16 before its
    # products, and d_c is returned in bf16.
    assert_rel_close(f"{name} d_e", got[1], want["d_e"], 8e-3)
    assert_rel_close(f"{name} d_c", got[2], want["d_c"], 8e-3)
  # The same products accumulated in f32 (bitwise equal here; allow f32 rounding).
  assert_rel_close("loss upcast vs native", upcast[0], native[0], 1e-7)
  assert_rel_close("d_e upcast vs native", upcast[1], native[1], 1e-6)
  assert_rel_close("d_c upcast vs native", upcast[2], native[2], 1e-6)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU upcast")
def test_token_stats_with_the_upcast_match_float64(monkeypatch):
  e, c, labels = _inputs(13)
  with monkeypatch.context() as patch:
    patch.setattr(tile_dot, "upcasts_16bit", lambda *arrays: True)
    got = jax.jit(lambda e, c: cce_jax.token_stats(e, c, impl="xla", block_sizes=BLOCKS))(e, c)
  want = stats64.stats(e, c)
  assert_rel_close("lse", got.lse, want["lse"], 1e-6)
  assert_rel_close("entropy", got.entropy, want["entropy"], 1e-5)
  weights = {name: np.ones((N,), np.float64) for name in ("lse", "entropy", "logprob")}
  grads = stats64.stats_grads(e, c, labels, None, weights)
  upcast = _grads(_objective_all, e, c, labels, monkeypatch, upcast=True)
  assert_rel_close("d_e", upcast[1], grads["d_e"], 8e-3)
  assert_rel_close("d_c", upcast[2], grads["d_c"], 8e-3)


def _objective_all(e, c, labels):
  stats = cce_jax.token_stats(e, c, labels, impl="xla", block_sizes=BLOCKS)
  return jnp.sum(stats.lse) + jnp.sum(stats.entropy) + jnp.sum(stats.logprob)


@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_vocab_order_of_a_16bit_classifier_on_cpu_is_exact_without_a_product(layout, dtype):
  """Lowered for CPU, the sort's score of a 16-bit classifier is a fused reduction (no matrix
  product, which XLA:CPU would run on an f32 copy of c): the order is still the float64 one.
  (Lowered for GPU the score stays a product: test_pallas_gpu's paper-shape buffer test.)"""
  from cce_jax import vocab_sort
  from cce_jax.options import LossOptions

  rng = np.random.default_rng(11)
  n, d, v = 37, 40, 517
  e = jnp.asarray(rng.normal(size=(n, d)), dtype)
  c_vd = jnp.asarray(rng.normal(size=(v, d)), dtype)
  bias = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
  c = c_vd if layout == "vd" else c_vd.T
  opts = LossOptions(classifier_layout=layout)
  order = jax.jit(lambda e, c, b: vocab_sort.vocab_order(e, c, b, opts))(e, c, bias)

  mean_e = np.asarray(jnp.mean(e.astype(jnp.float32), axis=0).astype(dtype), np.float64)
  score64 = np.asarray(c_vd, np.float64) @ mean_e + np.asarray(bias, np.float64)
  np.testing.assert_array_equal(np.asarray(order), np.argsort(-score64, kind="stable"))
  lowered = jax.jit(lambda e, c, b: vocab_sort.vocab_order(e, c, b, opts)).lower(e, c, bias)
  assert "dot_general" not in lowered.as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU lowering")
@pytest.mark.parametrize("objective", ["loss", "token_stats"])
def test_cpu_backward_writes_bf16_dc_blocks_without_an_f32_dc(objective):
  """XLA:CPU moves a 16-bit scatter or dynamic-update-slice to f32, converting the whole of
  dC to f32 and back around every block's write (quadratic in V). Compiled for CPU, the
  four-pass and token-statistics backwards write their bf16 dC blocks into 16-bit bits: no
  write of the compiled program has an f32 (V, D) result."""
  e, c, labels = _inputs(0)

  def fn(e, c):
    if objective == "loss":
      return cce_jax.linear_cross_entropy(e, c, labels, block_sizes=BLOCKS)
    stats = cce_jax.token_stats(e, c, labels, block_sizes=BLOCKS)
    return jnp.sum(stats.logprob) + jnp.sum(stats.entropy)

  hlo = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(e, c).compile().as_text()
  writes = [
    line for line in hlo.splitlines() if re.search(r"(scatter|dynamic-update-slice)\(", line)
  ]
  assert any(f"u16[{V},{D}]" in line for line in writes), writes  # the test sees the writes
  assert not any(f"f32[{V},{D}]" in line for line in writes), writes
