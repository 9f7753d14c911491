"""``impl="pallas_mosaic_gpu"``: the Mosaic GPU forward kernel (``pallas_kernels.mosaic_gpu``)
with the chunked backward.

On a CPU machine the kernel is lowered for CUDA with ``jax.export`` on every supported JAX, and
from JAX 0.11 runs in Mosaic GPU's interpret mode against the float64 reference (slow: a few
seconds per kernel call, so most of the option matrix is marked slow).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing import PAIRWISE, SINGLE_OPTION, assert_rel_close, check_case

import cce_jax
from cce_jax import xla_chunked
from cce_jax.options import LossOptions
from cce_jax.tiled import TiledInputs
from pallas_kernels.mosaic_gpu import MosaicGPUBlockSizes
from pallas_kernels.mosaic_gpu import implementation as mosaic_implementation
from pallas_kernels.probes import common, cuda_lowering, mosaic_gpu

interpret_only = pytest.mark.skipif(
  not mosaic_gpu.has_gpu_interpret_mode(), reason="Mosaic GPU interpret mode needs JAX >= 0.11"
)

# Small tiles: the matrix's 2 x 13 tokens, D = 24 and V = 75 span two vocabulary tiles (the
# second overlapping) and pad D to one chunk of 64 and the tokens to one block of 64.
BLOCKS = MosaicGPUBlockSizes(token_block=16, vocab_block=64)
CASES_16BIT = [case for case in PAIRWISE if case["dtype"] != "float32"] + [
  case for case in SINGLE_OPTION if case["dtype"] != "float32"
]


def _case_id(case: dict) -> str:
  return "-".join(f"{k}={v}" for k, v in case.items())


# Two cases with every option on between them (about 40 s each in interpret mode on a loaded
# 2-core machine: --runslow), and the 16-bit cases of the option matrix (--runslow).
_DEFAULT = {
  "dtype": "bfloat16",
  "reduction": "mean",
  "ignored": "some",
  "ignore_index": -100,
  "shift": 1,
  "softcap": 4.0,
  "z_loss": 0.05,
  "label_smoothing": 0.2,
  "return_lse": True,
  "bias": True,
  "classifier_layout": "vd",
  "sort_vocab": True,
}
DEFAULT_CASES = [
  _DEFAULT,
  {
    **_DEFAULT,
    "dtype": "float16",
    "classifier_layout": "dv",
    "reduction": "none",
    "softcap": None,
    "sort_vocab": False,
  },
]


@pytest.mark.slow
@interpret_only
@pytest.mark.parametrize("case", DEFAULT_CASES, ids=[_case_id(c) for c in DEFAULT_CASES])
def test_all_options_against_float64(case):
  check_case(
    "pallas_mosaic_gpu",
    case,
    seed=zlib.crc32(_case_id(case).encode()),
    block_sizes=BLOCKS,
    interpret=True,
  )


@pytest.mark.slow
@interpret_only
@pytest.mark.parametrize("case", CASES_16BIT, ids=[_case_id(c) for c in CASES_16BIT])
def test_option_matrix_16bit(case):
  check_case(
    "pallas_mosaic_gpu",
    case,
    seed=zlib.crc32(_case_id(case).encode()) + 2,
    block_sizes=BLOCKS,
    interpret=True,
  )


@pytest.mark.slow  # about 40 s in interpret mode on a loaded 2-core machine
@interpret_only
@pytest.mark.parametrize("layout, softcap, label_smoothing", [("vd", None, 0.1), ("dv", 6.0, 0.0)])
def test_residuals_are_what_the_chunked_backward_reads(layout, softcap, label_smoothing):
  """Ragged in every axis (N = 70: two overlapping token blocks; D = 72: two chunks, padded;
  V = 150: three vocabulary blocks, the last overlapping), bias, and filtering on sorted
  classes: the kernel's lse, logit sum and per-block maxima match the chunked forward's,
  block for block in the same class order."""
  rng = np.random.default_rng(11 if layout == "vd" else 12)
  num_tokens, hidden, num_classes = 70, 72, 150
  e = jnp.asarray(rng.normal(size=(num_tokens, hidden)) * 0.3, jnp.bfloat16)
  c = rng.normal(size=(num_classes, hidden)) * 0.3
  c = jnp.asarray(c if layout == "vd" else c.T, jnp.bfloat16)
  bias = jnp.asarray(rng.normal(size=(num_classes,)), jnp.float32)
  labels = jnp.asarray(rng.integers(-1, num_classes, size=(num_tokens,)), jnp.int32)
  opts = LossOptions(
    classifier_layout=layout,
    softcap=softcap,
    label_smoothing=label_smoothing,
    filter_eps=2.0**-12,
    block_sizes=BLOCKS,
    interpret=True,
  )
  assert opts.filters_anything
  got = mosaic_implementation.forward(TiledInputs(e, c, labels, bias), opts, True)
  want = xla_chunked.forward(e, c, labels, bias, opts, True)
  np.testing.assert_array_equal(got.residuals.order, want.residuals.order)
  assert got.residuals.block_max.shape == want.residuals.block_max.shape == (3, num_tokens)
  assert_rel_close("block_max", got.residuals.block_max, np.asarray(want.residuals.block_max), 1e-5)
  for name in ("lse", "target", "logit_sum"):
    if getattr(want, name) is None:
      assert getattr(got, name) is None, name
    else:
      assert_rel_close(name, getattr(got, name), np.asarray(getattr(want, name)), 1e-5)


@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_forward_kernel_lowers_for_cuda_at_a_large_shape(layout):
  """Loss and gradients at (N, D, V) = (4096, 2304, 32000), bf16, bias, softcap and filtering:
  one Mosaic GPU kernel (the forward) and no other custom call (the backward is chunked)."""
  num_tokens, hidden, num_classes = 4096, 2304, 32000
  c_shape = (num_classes, hidden) if layout == "vd" else (hidden, num_classes)

  def loss(e, c, labels, bias):
    return cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      bias=bias,
      impl="pallas_mosaic_gpu",
      classifier_layout=layout,
      softcap=30.0,
      block_sizes=MosaicGPUBlockSizes(),
    )

  args = (
    jax.ShapeDtypeStruct((num_tokens, hidden), jnp.bfloat16),
    jax.ShapeDtypeStruct(c_shape, jnp.bfloat16),
    jax.ShapeDtypeStruct((num_tokens,), jnp.int32),
    jax.ShapeDtypeStruct((num_classes,), jnp.float32),
  )
  exported = cuda_lowering.export_for_cuda(
    jax.value_and_grad(loss, argnums=(0, 1, 3)), args, custom_calls=(cuda_lowering.MOSAIC_GPU_CALL,)
  )
  assert common.custom_calls(exported.mlir_module()) == [cuda_lowering.MOSAIC_GPU_CALL]


def test_float32_is_rejected_naming_the_alternatives():
  e = jnp.ones((8, 16), jnp.float32)
  with pytest.raises(
    TypeError,
    match=r"float16 or bfloat16 `e` and `c`, got float32; use "
    r"impl='xla' or impl='pallas_gpu'",
  ):
    cce_jax.linear_cross_entropy(
      e, e, jnp.zeros((8,), jnp.int32), impl="pallas_mosaic_gpu", interpret=True
    )


@pytest.mark.skipif(mosaic_gpu.has_gpu_interpret_mode(), reason="JAX >= 0.11 interprets")
def test_interpret_needs_jax_0_11():
  e = jnp.ones((8, 16), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match=r"`interpret`=True .* needs JAX >= 0.11"):
    cce_jax.linear_cross_entropy(
      e, e, jnp.zeros((8,), jnp.int32), impl="pallas_mosaic_gpu", interpret=True
    )


@pytest.mark.parametrize(
  "field, value, error, message",
  [
    (
      "vocab_block",
      100,
      ValueError,
      r"`MosaicGPUBlockSizes.vocab_block` must be one of "
      r"\(64, 128, 256\).*got 100",
    ),
    ("token_block", 0, ValueError, r"`MosaicGPUBlockSizes.token_block` must be positive"),
    ("token_block", 16.0, TypeError, r"`MosaicGPUBlockSizes.token_block` must be an int"),
  ],
)
def test_bad_block_sizes_name_the_field(field, value, error, message):
  with pytest.raises(error, match=message):
    MosaicGPUBlockSizes(**{field: value})


def test_block_sizes_of_another_implementation_are_rejected():
  e = jnp.ones((8, 16), jnp.bfloat16)
  with pytest.raises((TypeError, ValueError), match="block_sizes"):
    cce_jax.linear_cross_entropy(
      e,
      e,
      jnp.zeros((8,), jnp.int32),
      impl="pallas_mosaic_gpu",
      block_sizes=cce_jax.BlockSizes(),
      interpret=True,
    )


@pytest.mark.slow  # interpret mode
@interpret_only
def test_vmap_folds_the_examples_into_one_kernel_call():
  """Under vmap the forward runs once over every example's tokens: the loss and gradients
  equal those of the examples one by one."""
  rng = np.random.default_rng(13)
  e = jnp.asarray(rng.normal(size=(2, 40, 24)), jnp.bfloat16)
  c = jnp.asarray(rng.normal(size=(75, 24)) * 0.5, jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, 75, size=(2, 40)), jnp.int32)

  def loss(e, c, labels):
    return cce_jax.linear_cross_entropy(
      e, c, labels, impl="pallas_mosaic_gpu", interpret=True, block_sizes=BLOCKS, filter_eps=None
    )

  grad = jax.value_and_grad(loss, argnums=(0, 1))
  batched, (d_e, d_c) = jax.vmap(grad, in_axes=(0, None, 0))(e, c, labels)
  for i in range(2):
    one, (d_e_one, d_c_one) = grad(e[i], c, labels[i])
    assert_rel_close("loss", batched[i], np.asarray(one), 1e-6)
    assert_rel_close("d_e", d_e[i], np.asarray(d_e_one, np.float32), 1e-2)
    assert_rel_close("d_c", d_c[i], np.asarray(d_c_one, np.float32), 1e-2)
