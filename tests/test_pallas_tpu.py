"""``impl="pallas_tpu"`` on CPU: TPU interpret mode against the float64 reference, and lowering
for real TPUs with ``jax.export`` (which catches what interpret mode lets pass, e.g. block
shapes that break the (8, 128) tiling rule).

Interpret mode is slow (each case compiles an interpreter of the kernels), so shapes are small;
the larger cases are marked slow.
"""

from __future__ import annotations

import contextlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
from testing import (
  PAIRWISE,
  SINGLE_OPTION,
  TOLERANCE,
  assert_rel_close,
  case_id,
  check_case,
  skipped_softmax_grad,
)

import cce_jax
from cce_jax import synthetic, vocab_sort
from cce_jax.loss_math import TokenCoefficients
from cce_jax.options import LossOptions
from cce_jax.tiled import TiledInputs
from pallas_kernels.tpu import IMPLEMENTATION, TPUBlockSizes, implementation, kernels
from pallas_kernels.tpu.block_sizes import (
  DEFAULT_VMEM_BUDGET,
  VMEM_HEADROOM,
  Tiles,
  kernel_vmem_bytes,
  resolve,
)

# The smallest legal tiles: every block a multiple of 128 (or the whole dimension).
SMALLEST = TPUBlockSizes(token_block=128, vocab_block=128, hidden_block=128)
FLOAT16_REASON = "impl='pallas_tpu' takes float32 or bfloat16 (TPUs have no float16 arithmetic)"
PAPER_SHAPE = (8192, 2304, 256000)  # N, D, V (Gemma 2 2B vocabulary, the paper's benchmark)
LLAMA3_SHAPE = (8192, 4096, 128256)  # Llama 3 8B
MIB = 1024 * 1024


# ---- the option matrix through the public API ----------------------------------------------


def _check(case: dict, seed: int) -> None:
  if case["dtype"] == "float16":
    with pytest.raises(TypeError, match="float32 or bfloat16"):
      check_case("pallas_tpu", case, seed, block_sizes=SMALLEST, interpret=True)
    pytest.skip(FLOAT16_REASON)
  check_case("pallas_tpu", case, seed, block_sizes=SMALLEST, interpret=True)


# Every option value also occurs in PAIRWISE, which runs by default; each option alone (the
# easier failure to read) runs with --runslow, to keep this file's default run within budget.
_SINGLE = [
  pytest.param(c, marks=() if c["dtype"] == "float16" else pytest.mark.slow) for c in SINGLE_OPTION
]


@pytest.mark.parametrize("case", _SINGLE, ids=[case_id(c) for c in SINGLE_OPTION])
def test_each_option_alone(case):
  _check(case, seed=zlib.crc32(case_id(case).encode()) + 1)


@pytest.mark.parametrize("case", PAIRWISE, ids=[case_id(c) for c in PAIRWISE])
def test_pairwise_options(case):
  _check(case, seed=zlib.crc32(case_id(case).encode()))


# ---- ragged sizes over several blocks of every axis ----------------------------------------


def _budget_for(*need: int) -> int:
  """The smallest VMEM budget whose headroom holds each of these kernels' estimates."""
  return int(-(-max(need) // VMEM_HEADROOM)) + 1


# N = 300 = 2 x 128 + 44 tokens, V = 400 = 3 x 128 + 16 classes, D = 200 = 128 + 72 (two hidden
# chunks at hidden_block=128, so the backward runs its two-phase tiles).
RAGGED_N, RAGGED_D, RAGGED_V = 300, 200, 400
# A budget at which the heuristic gives the backward two hidden chunks and the forward one.
TIGHT_BUDGET = TPUBlockSizes(
  token_block=128,
  vocab_block=128,
  vmem_budget_bytes=_budget_for(kernel_vmem_bytes(128, 128, 128, RAGGED_D, 4)["backward"]),
)
# A budget at which the forward takes 256 tokens per tile and the backward 128 (float32).
SPLIT_TOKEN_BLOCKS = TPUBlockSizes(
  vocab_block=128,
  hidden_block=128,
  vmem_budget_bytes=_budget_for(
    kernel_vmem_bytes(128, 128, 128, RAGGED_D, 4)["backward"],
    kernel_vmem_bytes(256, 128, 128, RAGGED_D, 4)["forward"],
  ),
)
RAGGED_CASES = [
  dict(
    dtype="float32",
    layout="vd",
    bias=True,
    softcap=4.0,
    label_smoothing=0.2,
    z_loss=0.05,
    blocks=TIGHT_BUDGET,
  ),
  dict(
    dtype="bfloat16",
    layout="dv",
    bias=True,
    softcap=None,
    label_smoothing=0.2,
    z_loss=0.0,
    blocks=SMALLEST,
  ),
  dict(
    dtype="float32",
    layout="dv",
    bias=True,
    softcap=None,
    label_smoothing=0.0,
    z_loss=0.0,
    blocks=SMALLEST,
  ),
  dict(
    dtype="float32",
    layout="vd",
    bias=False,
    softcap=None,
    label_smoothing=0.0,
    z_loss=0.05,
    blocks=TPUBlockSizes(128, 128, 256),
  ),  # one hidden chunk
  dict(
    dtype="float32",
    layout="vd",
    bias=False,
    softcap=30.0,
    label_smoothing=0.1,
    z_loss=0.0,
    blocks=SPLIT_TOKEN_BLOCKS,
  ),  # forward tiles of 256 tokens, backward tiles of 128
]
_RAGGED = [
  pytest.param(c, marks=pytest.mark.slow) if k in (2, 3) else c for k, c in enumerate(RAGGED_CASES)
]


def test_tight_budget_splits_hidden_unevenly():
  tiles = resolve(TIGHT_BUDGET, RAGGED_N, RAGGED_D, RAGGED_V, "float32")
  assert (tiles.num_token_blocks, tiles.num_vocab_blocks) == (3, 4)
  assert (tiles.num_hidden_blocks, tiles.num_forward_hidden_blocks) == (2, 1)


def test_forward_takes_more_tokens_than_the_backward():
  tiles = resolve(SPLIT_TOKEN_BLOCKS, RAGGED_N, RAGGED_D, RAGGED_V, "float32")
  assert (tiles.token_block, tiles.forward_token_block) == (128, 256)
  assert (tiles.num_token_blocks, tiles.num_forward_token_blocks) == (3, 2)
  assert tiles.for_forward()[:4] == (256, 128, tiles.forward_hidden_block, 2)


@pytest.mark.parametrize("case", _RAGGED, ids=[case_id(c) for c in RAGGED_CASES])
def test_ragged_blocks(case):
  """Loss, lse and every gradient at sizes that are not a multiple of any block."""
  rng = np.random.default_rng(zlib.crc32(case_id(case).encode()))
  e = (rng.normal(size=(RAGGED_N, RAGGED_D)) * 0.3 + 0.1).astype(np.float32)
  c = (rng.normal(size=(RAGGED_V, RAGGED_D)) * 0.3 + 0.05).astype(np.float32)
  if case["layout"] == "dv":
    c = np.ascontiguousarray(c.T)
  labels = rng.integers(0, RAGGED_V, size=(RAGGED_N,)).astype(np.int32)
  labels[rng.random(RAGGED_N) < 0.2] = -100
  bias = rng.normal(size=(RAGGED_V,)).astype(np.float32) if case["bias"] else None
  loss_weights = rng.normal(size=(RAGGED_N,))
  lse_weights = rng.normal(size=(RAGGED_N,)) * 0.1
  options = dict(
    ignore_index=-100,
    softcap=case["softcap"],
    reduction="none",
    shift=0,
    z_loss=case["z_loss"],
    label_smoothing=case["label_smoothing"],
    classifier_layout=case["layout"],
  )
  expected = reference64.reference(
    e, c, labels, bias, loss_weights=loss_weights, lse_weights=lse_weights, **options
  )
  dtype = jnp.dtype(case["dtype"])
  blocks = case["blocks"]

  def scalar(e, c, bias):
    loss, lse = cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      bias=bias,
      return_lse=True,
      impl="pallas_tpu",
      filter_eps=None,
      block_sizes=blocks,
      interpret=True,
      **options,
    )
    value = reference64.objective(
      loss, lse, jnp.asarray(loss_weights, jnp.float32), jnp.asarray(lse_weights, jnp.float32)
    )
    return value, (loss, lse)

  cast = lambda x: None if x is None else jnp.asarray(x, dtype)
  grad_fn = jax.jit(jax.value_and_grad(scalar, argnums=(0, 1, 2), has_aux=True))
  (_, (loss, lse)), (d_e, d_c, d_bias) = grad_fn(cast(e), cast(c), cast(bias))
  tol = TOLERANCE[case["dtype"]]
  loss_tol = 2e-5 if dtype == jnp.float32 else 1e-3
  assert_rel_close("loss", loss, expected["loss"], loss_tol)
  assert_rel_close("lse", lse, expected["lse"], loss_tol)
  assert d_e.dtype == dtype and d_c.dtype == dtype
  assert_rel_close("d_e", d_e, expected["d_e"], tol)
  assert_rel_close("d_c", d_c, expected["d_c"], tol)
  if bias is not None:
    assert_rel_close("d_bias", d_bias, expected["d_bias"], tol)


def test_vmap_folds_forward_and_maps_backward():
  """Under jax.vmap (forward folded into one kernel call, backward example by example, with
  filtering on so the block maxima are split per example) the loss and gradients are those of
  the "xla" implementation, itself checked against the float64 reference."""
  rng = np.random.default_rng(7)
  e = jnp.asarray(rng.normal(size=(3, 13, 24)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(75, 24)) * 0.5, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 75, size=(3, 13)), jnp.int32)

  def total(impl, blocks):
    per_example = lambda e1, c, labels1: cce_jax.linear_cross_entropy(
      e1,
      c,
      labels1,
      impl=impl,
      block_sizes=blocks,
      interpret=True,
      filter_eps=1e-3,
      label_smoothing=0.1,
      z_loss=0.01,
    )
    batched = jax.vmap(per_example, in_axes=(0, None, 0))
    return jax.jit(jax.value_and_grad(lambda e, c: jnp.sum(batched(e, c, labels)), argnums=(0, 1)))(
      e, c
    )

  loss, (d_e, d_c) = total("pallas_tpu", SMALLEST)
  loss_xla, (d_e_xla, d_c_xla) = total("xla", cce_jax.BlockSizes(token_block=8, vocab_block=32))
  assert_rel_close("loss", loss, loss_xla, 2e-5)
  assert_rel_close("d_e", d_e, d_e_xla, 2e-5)
  assert_rel_close("d_c", d_c, d_c_xla, 2e-5)


def test_bad_label_poisons_gradients_with_filtering():
  """A label outside [0, V) makes its loss NaN and NaN reaches dE and dC, also with filtering
  on (its rows never let a tile go)."""
  rng = np.random.default_rng(3)
  e = jnp.asarray(rng.normal(size=(40, 24)), jnp.bfloat16)
  c = jnp.asarray(rng.normal(size=(75, 24)), jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, 75, size=(40,)), jnp.int32).at[5].set(75)
  loss_fn = lambda e, c: cce_jax.linear_cross_entropy(
    e, c, labels, impl="pallas_tpu", block_sizes=SMALLEST, interpret=True
  )
  loss, (d_e, d_c) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(e, c)
  assert np.isnan(loss)
  assert np.isnan(np.asarray(d_e, np.float32)[5]).all()
  assert np.isfinite(np.delete(np.asarray(d_e, np.float32), 5, axis=0)).all()
  assert np.isnan(np.asarray(d_c, np.float32)).all()


# ---- gradient filtering and the vocabulary sort --------------------------------------------


def _unit_scale(lse):
  """The filter scale of an unweighted "sum" loss without z-loss: 1 for every token."""
  return jnp.ones_like(lse)


def _skip_table(e, c, labels, opts):
  return jax.jit(
    lambda e, c, labels: implementation.skip_table(
      TiledInputs(e, c, labels, None), _unit_scale, opts
    )
  )(e, c, labels)


@pytest.mark.parametrize(
  "filter_flags",
  [  # all slow: the per-class sort (the grouped default: test_pallas_tpu_grouped.py)
    pytest.param((True, True), marks=pytest.mark.slow),
    pytest.param((False, True), marks=pytest.mark.slow),
    pytest.param((True, False), marks=pytest.mark.slow),
  ],
  ids=["filter_e_and_c", "filter_c_only", "filter_e_only"],
)
def test_filtering_drops_exactly_the_skipped_tiles(filter_flags):
  """The filtered gradient is the exact one less the tiles of the skip table, the rule holds
  on every dropped entry, and the error is bounded by the dropped mass."""
  num_tokens, hidden, num_classes = 300, 64, 1000  # ragged: 3 x 8 tiles of 128 x 128
  filter_eps = 1e-2
  filter_e_grad, filter_c_grad = filter_flags
  e, c, labels = synthetic.trained_like_inputs(
    jax.random.key(1), num_tokens, hidden, num_classes, jnp.float32
  )
  blocks = TPUBlockSizes(token_block=128, vocab_block=128)
  opts = LossOptions(
    filter_eps=filter_eps,
    filter_e_grad=filter_e_grad,
    filter_c_grad=filter_c_grad,
    block_sizes=blocks,
    interpret=True,
  )
  skip = np.asarray(_skip_table(e, c, labels, opts))  # (token blocks, vocab blocks)
  assert skip.mean() >= 0.15, f"only {skip.mean():.2f} of the tiles skipped: test too weak"

  order = vocab_sort.vocab_order(e, c, None, opts)
  dx, dropped = skipped_softmax_grad(e, c, labels, skip, order, tile=128)  # "sum": g = 1
  e64, c64 = np.asarray(e, np.float64), np.asarray(c, np.float64)
  assert np.abs(dx[dropped]).max() < filter_eps  # the rule of cce_jax.tiled, on every entry
  kept = np.where(dropped, 0.0, dx)
  expected_e = (kept if filter_e_grad else dx) @ c64
  expected_c = (kept if filter_c_grad else dx).T @ e64

  d_e, d_c = jax.jit(
    jax.grad(
      lambda e, c: cce_jax.linear_cross_entropy(
        e,
        c,
        labels,
        reduction="sum",
        impl="pallas_tpu",
        filter_eps=filter_eps,
        filter_e_grad=filter_e_grad,
        filter_c_grad=filter_c_grad,
        block_sizes=blocks,
        interpret=True,
      ),
      argnums=(0, 1),
    )
  )(e, c)
  assert_rel_close("d_e", d_e, expected_e, 2e-5)
  assert_rel_close("d_c", d_c, expected_c, 2e-5)
  # Against the exact gradient the error stays within the mass of the dropped entries.
  lost = np.where(dropped, np.abs(dx), 0.0)
  assert np.linalg.norm(np.asarray(d_e) - dx @ c64) <= 1.01 * np.linalg.norm(lost @ np.abs(c64))
  assert np.linalg.norm(np.asarray(d_c) - dx.T @ e64) <= 1.01 * np.linalg.norm(
    lost.T @ np.abs(e64)
  ) + 1e-5 * np.linalg.norm(dx.T @ e64)


@pytest.mark.slow  # the per-class sort; the grouped default: test_pallas_tpu_grouped.py
def test_sort_makes_tiles_skippable():
  """On trained-like bf16 inputs the sorted vocabulary lets whole tiles go, the id order
  almost none; the per-class sort's count agrees with the "xla" implementation's skip table."""
  num_tokens, hidden, num_classes = 512, 128, 4096
  e, c, labels = synthetic.trained_like_inputs(
    jax.random.key(0), num_tokens, hidden, num_classes, jnp.bfloat16
  )
  fractions = {}
  for sort in (True, False):
    opts = LossOptions(
      filter_eps=2.0**-12,
      sort_vocab=sort,
      block_sizes=TPUBlockSizes(token_block=128, vocab_block=128, vocab_sort_group=1),
      interpret=True,
    )
    skip = _skip_table(e, c, labels, opts)
    fractions[sort] = float(jnp.mean(skip))
    xla = cce_jax.filter_stats(
      e,
      c,
      labels,
      filter_eps=2.0**-12,
      sort_vocab=sort,
      block_sizes=cce_jax.BlockSizes(token_block=128, vocab_block=128),
    )
    assert int(jnp.sum(skip)) == int(xla["skipped_tiles"])
  assert fractions[True] >= 0.1, fractions
  assert fractions[False] <= fractions[True] / 4, fractions


@pytest.mark.slow
def test_sort_skipped_fraction_larger():
  """The README's numbers: 1024 tokens, V = 8192, bf16, 128 x 128 tiles."""
  e, c, labels = synthetic.trained_like_inputs(jax.random.key(0), 1024, 256, 8192, jnp.bfloat16)
  fractions = {}
  for sort in (True, False):
    opts = LossOptions(
      filter_eps=2.0**-12,
      sort_vocab=sort,
      block_sizes=TPUBlockSizes(token_block=128, vocab_block=128, vocab_sort_group=1),
      interpret=True,
    )
    fractions[sort] = float(jnp.mean(_skip_table(e, c, labels, opts)))
  assert fractions[True] >= 0.5 and fractions[False] == 0.0, fractions


@pytest.mark.parametrize("group", [1, 16], ids=["per_class", "grouped"])
def test_sort_costs_one_classifier_copy(group):
  """The per-class sort's sorted copy of c is the only large temporary of loss+grad: the
  compiled program holds one (V, D) array more with it than without (what the README's memory
  table reports), and nothing of that size without it. The grouped sort (the default) reads c
  in place: no copy."""
  num_tokens, hidden, num_classes = 512, 256, 8192
  s = jax.ShapeDtypeStruct
  args = (
    s((num_tokens, hidden), jnp.float32),
    s((num_classes, hidden), jnp.float32),
    s((num_tokens,), jnp.int32),
  )
  copy_bytes = num_classes * hidden * 4

  def temp_bytes(sort_vocab):
    loss = lambda e, c, labels: cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      impl="pallas_tpu",
      block_sizes=TPUBlockSizes(256, 512, vocab_sort_group=group),
      interpret=True,
      sort_vocab=sort_vocab,
      filter_eps=1e-6,
    )
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  unsorted, sorted_ = temp_bytes(False), temp_bytes(True)
  assert unsorted < 0.25 * copy_bytes, unsorted
  if group == 1:
    assert 0.9 * copy_bytes <= sorted_ - unsorted <= 1.1 * copy_bytes, (sorted_, unsorted)
  else:
    assert sorted_ - unsorted < 0.25 * copy_bytes, (sorted_, unsorted)


# ---- lowering for real TPUs ------------------------------------------------------------------


@contextlib.contextmanager
def _pretend_tpu(device_kind: str):
  """Lets Mosaic lowering run on a CPU host by registering a TPU generation for "cpu".

  Uses JAX's private ``tpu_info`` registry (jax 0.10); skips when that API has moved.
  """
  try:
    from jax._src.pallas.mosaic import tpu_info

    chip = tpu_info.chip_version_from_device_kind(device_kind)
    info = lambda: tpu_info.get_tpu_info_for_chip(chip, 1)
    registry, get_info = tpu_info.registry, tpu_info.get_tpu_info
  except (ImportError, AttributeError) as err:
    pytest.skip(f"jax._src.pallas.mosaic.tpu_info moved ({err}): cannot lower for TPU on CPU")
  previous = registry.get("cpu")
  registry["cpu"] = info
  get_info.cache_clear()
  try:
    yield
  finally:
    if previous is None:
      registry.pop("cpu", None)
    else:
      registry["cpu"] = previous
    get_info.cache_clear()


def _export_both(shape, dtype, opts: LossOptions, with_bias: bool):
  """Exports the forward and the backward for TPU; returns the two MLIR modules."""
  num_tokens, hidden, num_classes = shape
  s = jax.ShapeDtypeStruct
  c_shape = (num_classes, hidden) if opts.classifier_layout == "vd" else (hidden, num_classes)
  args = (
    s((num_tokens, hidden), dtype),
    s(c_shape, dtype),
    s((num_tokens,), jnp.int32),
    s((num_classes,), dtype) if with_bias else None,
  )

  def forward(e, c, labels, bias):
    return IMPLEMENTATION.forward(TiledInputs(e, c, labels, bias), opts, for_backward=True)

  def backward(e, c, labels, bias, residuals, lse, coeffs, filter_scale):
    return IMPLEMENTATION.backward(
      TiledInputs(e, c, labels, bias), residuals, lse, coeffs, filter_scale, opts
    )

  fwd = jax.export.export(jax.jit(forward), platforms=["tpu"])(*args)
  vector = s((num_tokens,), jnp.float32)
  residuals = jax.eval_shape(forward, *args).residuals
  scale = vector if opts.filters_anything else None
  bwd = jax.export.export(jax.jit(backward), platforms=["tpu"])(
    *args, residuals, vector, TokenCoefficients(vector, vector, vector, vector), scale
  )
  return fwd.mlir_module(), bwd.mlir_module()


EXPORT_OPTIONS = {
  # bf16, bias, label smoothing outside the tiles, filtering with the sort, default tiles.
  "bf16-filtered": (
    jnp.bfloat16,
    LossOptions(filter_eps=2.0**-12, label_smoothing=0.1, block_sizes=TPUBlockSizes()),
    True,
  ),
  # f32, (D, V) classifier, softcap with smoothing in the tiles, exact, 32 MiB tiles.
  "f32-dv-softcap": (
    jnp.float32,
    LossOptions(
      softcap=30.0,
      label_smoothing=0.1,
      classifier_layout="dv",
      block_sizes=TPUBlockSizes(vmem_budget_bytes=32 * MIB),
    ),
    False,
  ),
  # bf16, one hidden chunk (32 MiB budget at the paper shape), filtering dE only.
  "bf16-32MiB-filter-e": (
    jnp.bfloat16,
    LossOptions(
      filter_eps=2.0**-12,
      filter_c_grad=False,
      z_loss=1e-4,
      block_sizes=TPUBlockSizes(vmem_budget_bytes=32 * MIB),
    ),
    True,
  ),
}


@pytest.mark.parametrize("variant", list(EXPORT_OPTIONS))
@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])
@pytest.mark.parametrize("shape", [PAPER_SHAPE, LLAMA3_SHAPE], ids=["paper", "llama3_8b"])
def test_lowers_for_tpu(shape, device_kind, variant):
  """Every kernel lowers through Mosaic at real shapes and default block choices."""
  dtype, opts, with_bias = EXPORT_OPTIONS[variant]
  with _pretend_tpu(device_kind):
    modules = _export_both(shape, dtype, opts, with_bias)
  assert all("tpu_custom_call" in m for m in modules)


def test_export_rejects_what_a_tpu_rejects():
  """The lowering check is real: a 100-row block (not a multiple of 8 x 128) fails to lower,
  while interpret mode would run it."""
  num_tokens, hidden, num_classes = 1024, 256, 1024
  math = kernels.Math(softcap=None, with_bias=False, uniform_in_tile=False, precision=None)
  s = jax.ShapeDtypeStruct

  def lower(token_block):
    tiles = Tiles(
      token_block,
      128,
      hidden,
      -(-num_tokens // token_block),
      num_classes // 128,
      1,
      DEFAULT_VMEM_BUDGET,
      hidden,
      1,
    )
    geo = kernels.Geometry(num_tokens, num_classes, hidden, 0, tiles)
    fn = lambda e, c: kernels.forward_stats(e, c, None, geo, math, False, True, False)
    return jax.export.export(jax.jit(fn), platforms=["tpu"])(
      s((num_tokens, hidden), jnp.bfloat16), s((num_classes, hidden), jnp.bfloat16)
    )

  with _pretend_tpu("TPU v5 lite"):
    lower(128)
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
      lower(100)


# ---- block sizes and the VMEM heuristic ------------------------------------------------------


@pytest.mark.parametrize(
  "field, value, error, match",
  [
    ("token_block", 100, ValueError, "token_block` must be a positive multiple of 128"),
    ("vocab_block", 0, ValueError, "vocab_block` must be a positive multiple of 128"),
    ("hidden_block", 64, ValueError, "hidden_block` must be a positive multiple of 128"),
    ("token_block", 256.0, TypeError, "token_block` must be an int or None"),
    ("vocab_block", True, TypeError, "vocab_block` must be an int or None"),
    ("vmem_budget_bytes", None, TypeError, "vmem_budget_bytes` must be an int"),
    ("vmem_budget_bytes", 1000, ValueError, "vmem_budget_bytes` must be at least 1 MiB"),
  ],
)
def test_block_sizes_validation(field, value, error, match):
  with pytest.raises(error, match=match):
    TPUBlockSizes(**{field: value})


def test_block_sizes_in_the_api():
  e = jnp.ones((4, 8), jnp.float32)
  c = jnp.ones((16, 8), jnp.float32)
  labels = jnp.zeros((4,), jnp.int32)
  with pytest.raises(TypeError, match="block_sizes"):
    cce_jax.linear_cross_entropy(
      e, c, labels, impl="pallas_tpu", interpret=True, block_sizes=cce_jax.BlockSizes()
    )
  assert TPUBlockSizes.get_default(jnp.bfloat16) == TPUBlockSizes()
  assert IMPLEMENTATION.resolve_block_sizes(None, jnp.float32) == TPUBlockSizes()


@pytest.mark.parametrize("budget", [16 * MIB, 32 * MIB], ids=["16MiB", "32MiB"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape", [PAPER_SHAPE, LLAMA3_SHAPE], ids=["paper", "llama3_8b"])
def test_vmem_heuristic_fits(shape, dtype, budget):
  """At real shapes the default tiles keep every kernel within the budget (16 MiB: v4/v5e
  default scoped VMEM; 32 MiB: v5p/v6e), obey the tiling rules, and use a larger budget for
  larger vocabulary blocks (backward) and token blocks (forward)."""
  num_tokens, hidden, num_classes = shape
  tiles = resolve(TPUBlockSizes(vmem_budget_bytes=budget), num_tokens, hidden, num_classes, dtype)
  itemsize = jnp.dtype(dtype).itemsize
  need = kernel_vmem_bytes(
    tiles.token_block, tiles.vocab_block, tiles.hidden_block, hidden, itemsize
  )
  need["forward"] = kernel_vmem_bytes(
    tiles.forward_token_block, tiles.vocab_block, tiles.forward_hidden_block, hidden, itemsize
  )["forward"]
  assert max(need.values()) <= VMEM_HEADROOM * budget, need
  assert tiles.vmem_limit_bytes == budget
  for block in (
    tiles.token_block,
    tiles.vocab_block,
    tiles.hidden_block,
    tiles.forward_hidden_block,
    tiles.forward_token_block,
  ):
    assert (block % 128 == 0 and block >= 128) or block == hidden, tiles
  assert tiles.num_hidden_blocks == -(-hidden // tiles.hidden_block)
  assert tiles.forward_hidden_block >= tiles.hidden_block
  assert tiles.forward_token_block >= tiles.token_block
  assert tiles.forward_token_block % 128 == 0, tiles
  assert tiles.num_forward_token_blocks == -(-num_tokens // tiles.forward_token_block)
  assert tiles.num_forward_hidden_blocks == -(-hidden // tiles.forward_hidden_block)
  if budget > 16 * MIB:
    small = resolve(TPUBlockSizes(), num_tokens, hidden, num_classes, dtype)
    # What the HBM traffic falls with: the backward's vocabulary block, the forward's token block.
    assert tiles.vocab_block >= small.vocab_block, (tiles, small)
    assert tiles.forward_token_block >= small.forward_token_block, (tiles, small)


def test_vmem_heuristic_choices():
  """The documented choices: whole D and the largest tiles when they fit, clamping to small
  problems, explicit sizes kept, and an error naming the sizes when nothing fits."""
  # The backward's token block clamps to N rounded up to 16 rows (its dE DMA offsets must be
  # tile-aligned for Mosaic: 500 rows failed to compile for TPU), the forward's to N.
  tiles = resolve(TPUBlockSizes(), 26, 24, 75, "bfloat16")
  assert tiles[:6] == (32, 75, 24, 1, 1, 1) and tiles.forward_token_block == 26
  assert resolve(TPUBlockSizes(), 500, 256, 1000, "bfloat16").token_block == 512
  tiles = resolve(TPUBlockSizes(vmem_budget_bytes=64 * MIB), *PAPER_SHAPE, "bfloat16")
  assert tiles[:3] == (512, 512, 2304)
  tiles = resolve(TPUBlockSizes(token_block=128, hidden_block=256), *PAPER_SHAPE, "bfloat16")
  assert tiles.token_block == 128 and tiles.hidden_block == 256
  with pytest.raises(ValueError, match="token_block=2048, vocab_block=2048, hidden_block=2304"):
    resolve(TPUBlockSizes(2048, 2048, 2304), *PAPER_SHAPE, "float32")


def test_float16_is_rejected_clearly():
  e = jnp.ones((4, 8), jnp.float16)
  with pytest.raises(TypeError, match="float32 or bfloat16 `e` and `c`, got float16"):
    cce_jax.linear_cross_entropy(
      e,
      jnp.ones((16, 8), jnp.float16),
      jnp.zeros((4,), jnp.int32),
      impl="pallas_tpu",
      interpret=True,
    )


def test_float64_is_rejected_with_its_own_advice():
  """The float64 message speaks of float64 (it used to give the float16 advice)."""
  with jax.enable_x64(True):
    e = jnp.ones((4, 8), jnp.float64)
    with pytest.raises(
      TypeError,
      match=r"got float64 \(the TPU kernels have no float64; cast "
      r"to float32, or use impl='xla' or impl='reference'",
    ):
      cce_jax.linear_cross_entropy(
        e,
        jnp.ones((16, 8), jnp.float64),
        jnp.zeros((4,), jnp.int32),
        impl="pallas_tpu",
        interpret=True,
      )
