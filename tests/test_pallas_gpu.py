"""``impl="pallas_gpu"``: Pallas kernels on the Triton lowering (``pallas_kernels.gpu``).

On a CPU machine the kernels run in interpret mode (``interpret=True``) against the float64
reference, and are lowered for CUDA with ``jax.export`` (which runs the Pallas-to-Triton
lowering and catches what interpret mode lets through, e.g. index forms Triton rejects; it does
not check shared memory, hence the budget tests). Tests marked ``gpu`` run the compiled kernels
and are skipped without a CUDA GPU.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference64
from jax.interpreters import mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from testing import (
  PAIRWISE,
  SINGLE_OPTION,
  TOLERANCE,
  assert_rel_close,
  case_id,
  check_case,
  primitive_names,
)

import cce_jax
from cce_jax import synthetic
from cce_jax.loss_math import TokenCoefficients
from cce_jax.options import LossOptions
from cce_jax.tiled import TiledInputs
from pallas_kernels.gpu import SHARED_MEMORY_LIMITS, GPUBlockSizes, implementation
from pallas_kernels.probes import cuda_lowering

# JAX >= 0.11 warns at every Triton lowering that Pallas' Triton backend is deprecated. The
# kernels keep that lowering until its successor lands (docs/gpu_backend.md); the library
# leaves the warning to its users (the README says how to silence it), this module silences
# it (only it: the lowering tests below would repeat it dozens of times), and
# test_triton_lowering_warns_only_of_the_triton_deprecation checks it is the only warning.
_TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"
pytestmark = pytest.mark.filterwarnings(f"ignore:{_TRITON_DEPRECATION}:DeprecationWarning")

# Small tiles, so that the option matrix's 2 x 13 tokens, D = 24 and V = 75 are ragged in
# every axis and span several blocks of each; with 16-bit inputs the dC kernel's 2 persistent
# programs take 5 class blocks of 16 (two per forward block) in 3 rounds, the last one short.
BLOCKS = GPUBlockSizes(
  token_block=16, vocab_block=32, hidden_block=16, grad_c_vocab_block=16, grad_c_programs=2
)


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


gpu_only = pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")


# ---- the option matrix, interpret mode, against the float64 reference ----------------------


def test_public_api_runs_the_three_kernels():
  """The matrix below really runs Pallas: one forward and two backward pallas_calls."""
  e = jnp.ones((20, 24), jnp.float32)
  c = jnp.ones((40, 24), jnp.float32)
  labels = jnp.zeros((20,), jnp.int32)
  loss = lambda e, c: cce_jax.linear_cross_entropy(
    e, c, labels, impl="pallas_gpu", interpret=True, block_sizes=BLOCKS
  )
  names = primitive_names(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(e, c).jaxpr)
  assert names.count("pallas_call") == 3


@pytest.mark.parametrize("case", PAIRWISE, ids=[case_id(c) for c in PAIRWISE])
def test_pairwise_options(case):
  check_case(
    "pallas_gpu", case, zlib.crc32(case_id(case).encode()), block_sizes=BLOCKS, interpret=True
  )


@pytest.mark.slow
@pytest.mark.parametrize("case", SINGLE_OPTION, ids=[case_id(c) for c in SINGLE_OPTION])
def test_each_option_alone(case):
  # Every option value also appears in float32 among the pairwise cases, which run by default.
  check_case(
    "pallas_gpu", case, zlib.crc32(case_id(case).encode()) + 1, block_sizes=BLOCKS, interpret=True
  )


# ---- vmap: the forward folded into one kernel call, the backward example by example -------


def _vmap_inputs(classifier_per_example: bool = False):
  rng = np.random.default_rng(7)
  e = jnp.asarray(rng.normal(size=(3, 13, 24)), jnp.float32)
  c_shape = (3, 75, 24) if classifier_per_example else (75, 24)
  c = jnp.asarray(rng.normal(size=c_shape) * 0.5, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 75, size=(3, 13)), jnp.int32)
  return e, c, labels


def _vmapped_loss(impl: str, blocks, c_axis):
  per_example = lambda e1, c1, labels1: cce_jax.linear_cross_entropy(
    e1,
    c1,
    labels1,
    impl=impl,
    block_sizes=blocks,
    interpret=True,
    filter_eps=1e-3,
    label_smoothing=0.1,
    z_loss=0.01,
  )
  return jax.vmap(per_example, in_axes=(0, c_axis, 0))


def test_vmap_folds_forward_and_maps_backward():
  """Under jax.vmap with a shared classifier the forward is one kernel call over all 3 x 13
  tokens, the backward runs example by example (filtering on, so the block maxima are split
  per example), and loss and gradients are those of "xla", itself checked against float64."""
  e, c, labels = _vmap_inputs()

  def total(impl, blocks):
    batched = _vmapped_loss(impl, blocks, None)
    return jax.jit(jax.value_and_grad(lambda e, c: jnp.sum(batched(e, c, labels)), argnums=(0, 1)))(
      e, c
    )

  loss, (d_e, d_c) = total("pallas_gpu", BLOCKS)
  loss_xla, (d_e_xla, d_c_xla) = total("xla", cce_jax.BlockSizes(token_block=8, vocab_block=32))
  assert_rel_close("loss", loss, loss_xla, 2e-5)
  assert_rel_close("d_e", d_e, d_e_xla, 2e-5)
  assert_rel_close("d_c", d_c, d_c_xla, 2e-5)
  # The fold: the forward's one pallas_call sees every example's tokens as one (39, 24) e.
  jaxpr = jax.make_jaxpr(_vmapped_loss("pallas_gpu", BLOCKS, None))(e, c, labels).jaxpr
  calls = [q for q in _equations(jaxpr) if q.primitive.name == "pallas_call"]
  assert len(calls) == 1 and calls[0].invars[0].aval.shape == (39, 24)


def test_vmap_with_a_classifier_per_example_runs_the_examples_in_sequence():
  e, c, labels = _vmap_inputs(classifier_per_example=True)
  loss = jax.jit(_vmapped_loss("pallas_gpu", BLOCKS, 0))(e, c, labels)
  want = _vmapped_loss("xla", cce_jax.BlockSizes(token_block=8, vocab_block=32), 0)(e, c, labels)
  assert_rel_close("loss", loss, want, 2e-5)
  for b in range(3):
    exact = reference64.mean_reference(e[b], c[b], labels[b], z_loss=0.01, label_smoothing=0.1)
    assert_rel_close(f"loss[{b}]", loss[b], exact["loss"], 2e-5)


def _equations(jaxpr):
  yield from jaxpr.eqns
  for sub in jax.extend.core.subjaxprs(jaxpr):
    yield from _equations(sub)


# ---- the persistent dC kernel of 16-bit inputs --------------------------------------------

# Class blocks of 16 in dC, 4 per forward block of 64; 4 programs take them in turns.
PERSISTENT_BLOCKS = GPUBlockSizes(
  token_block=16, vocab_block=64, hidden_block=16, grad_c_vocab_block=16, grad_c_programs=4
)


@pytest.mark.parametrize(
  "dtype, layout, sort_vocab, options",
  [
    ("bfloat16", "vd", True, dict(label_smoothing=0.1, z_loss=1e-3)),
    pytest.param(
      "float16", "dv", False, dict(softcap=20.0, label_smoothing=0.1), marks=pytest.mark.slow
    ),
  ],
)
def test_persistent_grad_c_matches_float64_at_ragged_sizes(dtype, layout, sort_vocab, options):
  """37 tokens (16-token blocks), D = 40 (16-wide chunks) and V = 213: 14 dC class blocks of
  16, the last overlapping, taken by 4 persistent programs in 4 rounds (the last one short);
  loss and gradients against the float64 reference. Interpret mode runs the programs in
  order, so the last block (program 1) writes after the one it overlaps (program 0): a store
  of rows that are not its own would show."""
  num_tokens, hidden, num_classes = 37, 40, 213
  rng = np.random.default_rng(16)
  e = jnp.asarray(rng.normal(size=(num_tokens, hidden)), dtype)
  c_vd = rng.normal(size=(num_classes, hidden)) * 0.3
  c = jnp.asarray(c_vd if layout == "vd" else c_vd.T, dtype)
  bias = jnp.asarray(rng.normal(size=(num_classes,)) * 0.5, dtype)
  labels = jnp.asarray(rng.integers(0, num_classes, size=(num_tokens,)), jnp.int32)
  labels = labels.at[5].set(-100)
  common = dict(ignore_index=-100, classifier_layout=layout, **options)

  def loss_fn(e, c, bias):
    return cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      bias=bias,
      impl="pallas_gpu",
      interpret=True,
      block_sizes=PERSISTENT_BLOCKS,
      filter_eps=None,
      sort_vocab=sort_vocab,
      **common,
    )

  loss, (d_e, d_c, d_bias) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)))(e, c, bias)
  exact = reference64.mean_reference(
    e,
    c,
    labels,
    bias,
    softcap=options.get("softcap"),
    z_loss=options.get("z_loss", 0.0),
    label_smoothing=options["label_smoothing"],
    classifier_layout=layout,
  )
  chex.assert_type([d_e, d_c, d_bias], jnp.dtype(dtype))
  tol = TOLERANCE[dtype]
  assert_rel_close("loss", loss, exact["loss"], 1e-3)
  assert_rel_close("d_e", d_e, exact["d_e"], tol)
  assert_rel_close("d_c", d_c, exact["d_c"], tol)
  assert_rel_close("d_bias", d_bias, exact["d_bias"], tol)


def test_persistent_grad_c_skips_the_tiles_of_its_forward_block():
  """With filtering, each dC class block of 16 reads the skip-table column of the forward
  block of 64 it lies in: tiles are skipped (4 of 20), and the bfloat16 gradients stay within
  bfloat16 rounding of the exact float64 ones (skipping the tiles of another column drops
  gradient mass: 0.48 relative error in dC)."""
  num_tokens, hidden, num_classes = 64, 32, 300  # 19 dC blocks: 4 programs, 5 rounds
  e, c, labels = synthetic.trained_like_inputs(
    jax.random.key(3), num_tokens, hidden, num_classes, jnp.bfloat16
  )
  options = dict(filter_eps=2.0**-7, sort_vocab=True)
  opts = LossOptions(block_sizes=PERSISTENT_BLOCKS, interpret=True, **options)
  table_fn = lambda e, c: implementation.skip_table(
    TiledInputs(e, c, labels, None), jnp.ones_like, opts
  )
  table = np.asarray(jax.jit(table_fn)(e, c))
  assert table.shape == (4, 5)
  assert 0 < table.sum() < table.size

  loss_fn = lambda e, c: cce_jax.linear_cross_entropy(
    e, c, labels, impl="pallas_gpu", interpret=True, block_sizes=PERSISTENT_BLOCKS, **options
  )
  d_e, d_c = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(e, c)
  exact = reference64.mean_reference(e, c, labels)
  assert_rel_close("d_e", d_e, exact["d_e"], TOLERANCE["bfloat16"])
  assert_rel_close("d_c", d_c, exact["d_c"], TOLERANCE["bfloat16"])


# ---- gradient filtering: tests/test_filtering.py, parametrized over the implementations ----


# ---- lowering for CUDA on the CPU machine --------------------------------------------------

PAPER_SHAPE = (8192, 2304, 256000)  # N, D, V (Gemma 2 2B)


def _loss_and_grads(opts: LossOptions):
  """Forward for a backward and the backward, as ``cce_jax.differentiable`` calls them."""

  def run(e, c, labels, bias):
    inputs = TiledInputs(e, c, labels, bias)
    out = implementation.forward(inputs, opts, True)
    coeffs = TokenCoefficients(g=out.lse, alpha=out.lse, beta=out.lse, gamma=out.lse)
    scale = out.lse if opts.filters_anything else None
    return out.lse, implementation.backward(inputs, out.residuals, out.lse, coeffs, scale, opts)

  return run


def _abstract_args(num_tokens, hidden, num_classes, dtype, layout, bias):
  c_shape = (num_classes, hidden) if layout == "vd" else (hidden, num_classes)
  return (
    jax.ShapeDtypeStruct((num_tokens, hidden), dtype),
    jax.ShapeDtypeStruct(c_shape, dtype),
    jax.ShapeDtypeStruct((num_tokens,), jnp.int32),
    jax.ShapeDtypeStruct((num_classes,), dtype) if bias else None,
  )


def _export_for_cuda(fn, args, mesh=None):
  return cuda_lowering.export_for_cuda(fn, args, mesh=mesh)


@pytest.mark.parametrize(
  "dtype, layout, sort_vocab, options",
  [
    ("bfloat16", "vd", True, dict(filter_eps=2.0**-12, label_smoothing=0.1)),
    ("bfloat16", "dv", True, dict(filter_eps=2.0**-12, softcap=30.0)),
    ("bfloat16", "vd", False, dict(filter_eps=2.0**-12, filter_c_grad=False)),
    ("float16", "dv", False, dict(filter_eps=None, softcap=30.0, label_smoothing=0.1)),
    ("float32", "vd", True, dict(filter_eps=None, z_loss=1e-4)),
    ("float32", "dv", True, dict(filter_eps=2.0**-28, filter_e_grad=False)),
  ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_kernels_lower_for_cuda_at_the_paper_shape(dtype, layout, sort_vocab, options, bias):
  num_tokens, hidden, num_classes = PAPER_SHAPE
  opts = LossOptions(
    classifier_layout=layout,
    sort_vocab=sort_vocab,
    block_sizes=GPUBlockSizes.get_default(dtype),
    **options,
  )
  args = _abstract_args(num_tokens, hidden, num_classes, jnp.dtype(dtype), layout, bias)
  exported = _export_for_cuda(_loss_and_grads(opts), args)
  module = exported.mlir_module()
  # Three Triton kernels (forward, dE, dC), in that order, and nothing else of Pallas.
  assert module.count("custom_call @__gpu$xla.gpu.triton") == 3
  assert re.findall(r'name = "(cce_\w+)"', module) == ["cce_forward", "cce_grad_e", "cce_grad_c"]


def _tensor_bytes(value_type) -> tuple[int, str, int]:
  """(elements, element type, bytes) of a ranked tensor type."""
  tensor = mlir.ir.RankedTensorType(value_type)
  elements = int(np.prod(tensor.shape, dtype=np.int64))
  element = str(tensor.element_type)
  bits = int(re.fullmatch(r"[a-z]+(\d+)", element).group(1))
  return elements, element, elements * bits // 8


def _tensor_results(module_text: str):
  """(operation name, (elements, element type, bytes), is a kernel custom call, is returned by
  main) of every tensor result of every operation in every function of an exported module."""
  found = []
  with mlir.make_ir_context():
    module = mlir.ir.Module.parse(module_text)
    for function in module.body.operations:
      body = function.regions[0].blocks[0]
      is_main = mlir.ir.StringAttr(function.attributes["sym_name"]).value == "main"
      returned = list(list(body.operations)[-1].operands) if is_main else []
      _collect_tensor_results(body, returned, found)
  return found


def _collect_tensor_results(block, returned, found) -> None:
  for op in block.operations:
    kernel = op.name == "stablehlo.custom_call" and cuda_lowering.TRITON_CALL in str(
      op.attributes["call_target_name"]
    )
    for result in op.results:
      if isinstance(result.type, mlir.ir.RankedTensorType):
        is_output = any(result == value for value in returned)
        found.append((op.name, _tensor_bytes(result.type), kernel, is_output))
    for region in op.regions:
      for inner in region.blocks:
        _collect_tensor_results(inner, returned, found)


@pytest.mark.parametrize("layout, bias", [("vd", False), ("dv", True)])
def test_backward_holds_no_f32_vocabulary_by_hidden_buffer_at_the_paper_shape(layout, bias):
  """bfloat16 at the paper's shape, filtering and the vocabulary sort on: no tensor of V x D
  f32 elements anywhere in the lowered forward + backward (the dC kernel writes bfloat16 from
  per-program f32 buffers), and the buffers the kernels allocate besides the gradients (the
  forward's block maxima and partial sums, the dC kernel's buffers) stay under 10% of the
  gradients' bytes. (Elementwise ops between kernels are not counted: XLA fuses them.)"""
  num_tokens, hidden, num_classes = PAPER_SHAPE
  opts = LossOptions(
    classifier_layout=layout,
    sort_vocab=True,
    filter_eps=2.0**-12,
    block_sizes=GPUBlockSizes.get_default(jnp.bfloat16),
  )
  args = _abstract_args(num_tokens, hidden, num_classes, jnp.bfloat16, layout, bias)
  results = _tensor_results(_export_for_cuda(_loss_and_grads(opts), args).mlir_module())
  f32_vocab_by_hidden = [
    (name, elements)
    for name, (elements, element, _), _, _ in results
    if element == "f32" and elements >= num_classes * hidden
  ]
  assert not f32_vocab_by_hidden
  outputs = [size for _, (elements, _, size), _, out in results if out and elements > num_tokens]
  gradient_bytes = sum(outputs)  # dE (N, D) f32, dC (V, D) bf16, d_bias (V,) f32
  assert gradient_bytes == (num_tokens * hidden + bias * num_classes) * 4 + num_classes * hidden * 2
  temporaries = sum(size for _, (_, _, size), kernel, out in results if kernel and not out)
  assert temporaries < 0.1 * gradient_bytes, (temporaries, gradient_bytes)


@pytest.mark.parametrize("generation", sorted(SHARED_MEMORY_LIMITS))
def test_kernels_lower_for_each_gpu_generation(generation):
  """The default tiles of each generation lower for that GPU (sm_80 for "a100", sm_90 for
  "h100" on JAX >= 0.11, which reads the target from an abstract device; JAX 0.10 lowers both
  for sm_90)."""
  opts = LossOptions(
    filter_eps=2.0**-12, block_sizes=GPUBlockSizes.get_default("bfloat16", generation=generation)
  )
  args = _abstract_args(4099, 2304, 50_001, jnp.bfloat16, "vd", True)
  module = cuda_lowering.export_for_cuda(
    _loss_and_grads(opts), args, generation=generation
  ).mlir_module()
  assert re.findall(r'name = "(cce_\w+)"', module) == ["cce_forward", "cce_grad_e", "cce_grad_c"]


def test_triton_lowering_warns_only_of_the_triton_deprecation():
  opts = LossOptions(filter_eps=2.0**-12, block_sizes=GPUBlockSizes.get_default("bfloat16"))
  args = _abstract_args(300, 64, 1000, jnp.bfloat16, "vd", False)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _export_for_cuda(_loss_and_grads(opts), args)
  messages = {str(warning.message) for warning in caught}
  others = {message for message in messages if not message.startswith(_TRITON_DEPRECATION)}
  assert not others
  if cuda_lowering.reads_abstract_gpu_device():  # JAX >= 0.11 deprecates the Triton lowering
    assert {warning.category for warning in caught} == {DeprecationWarning}
    assert messages


def test_kernels_lower_inside_shard_map_with_check_vma(monkeypatch):
  """Vocabulary-parallel inside a user's shard_map with check_vma=True: the kernels' inputs
  and outputs carry the varying manual axes (a one-device mesh is enough to lower)."""
  # Exported for CUDA from this host: the loss's up-front backend check must see a GPU.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  mesh = cuda_lowering.cuda_mesh(("data", "tensor"))
  specs = (P("data"), P("tensor"), P("data"))

  def per_device(e, c, labels):
    loss = cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      impl="pallas_gpu",
      vocab_axis="tensor",
      reduction="sum",
      block_sizes=GPUBlockSizes(),
    )
    return jax.lax.psum(loss, "data")

  def loss_grads(e, c, labels):
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=True)
    return jax.grad(sharded, argnums=(0, 1))(e, c, labels)

  args = [
    jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
    for shape, dtype, spec in zip(
      ((256, 64), (1000, 64), (256,)), (jnp.bfloat16, jnp.bfloat16, jnp.int32), specs, strict=True
    )
  ]
  module = _export_for_cuda(loss_grads, args, mesh).mlir_module()
  assert module.count("custom_call @__gpu$xla.gpu.triton") == 3


def _triton_ir(fn, args) -> str:
  """The Triton IR of every kernel in ``fn``, printed by the lowering (``debug=True``)."""
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    _export_for_cuda(fn, args)
  return buffer.getvalue()


def _pointer_offset_widths(ir: str, element: str) -> set[str]:
  """Integer widths of the offsets added to tensors of pointers to ``element``."""
  pattern = rf"tt\.addptr .*: tensor<[0-9x]+!tt\.ptr<{element}>>, tensor<[0-9x]+x(i\d+)>"
  return set(re.findall(pattern, ir))


@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_offsets_are_64_bit_past_2_31_elements(layout):
  """N x D and V x D beyond 2**31 (a 100B-class model's classifier: V=256000, D=12288, with
  256k tokens): every pointer offset into e, c, dE and dC is computed in 64 bits; at the paper
  shape they are 32-bit, so the test can tell the two apart."""
  opts = LossOptions(
    classifier_layout=layout,
    filter_eps=2.0**-12,
    block_sizes=GPUBlockSizes.get_default(jnp.bfloat16),
  )

  def run(e, c, labels, bias):
    inputs = TiledInputs(e, c, labels, bias)
    out = implementation.forward(inputs, opts, True, debug=True)
    coeffs = TokenCoefficients(g=out.lse, alpha=out.lse, beta=out.lse, gamma=out.lse)
    return implementation.backward(
      inputs, out.residuals, out.lse, coeffs, out.lse, opts, debug=True
    )

  big = _triton_ir(run, _abstract_args(2**18, 12288, 256000, jnp.bfloat16, layout, False))
  assert 256000 * 12288 > 2**31 and 2**18 * 12288 > 2**31
  assert big.count("The Triton module for pallas_call") == 3
  assert _pointer_offset_widths(big, "bf16") == {"i64"}  # e and c, every kernel
  assert _pointer_offset_widths(big, "f32") >= {"i64"}  # dE and dC (lse & co: i32 is fine)
  small = _triton_ir(
    run, _abstract_args(*PAPER_SHAPE[:2], PAPER_SHAPE[2], jnp.bfloat16, layout, False)
  )
  assert _pointer_offset_widths(small, "bf16") == {"i32"}


# ---- block sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize("generation", sorted(SHARED_MEMORY_LIMITS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_default_block_sizes_fit_shared_memory(generation, dtype):
  sizes = GPUBlockSizes.get_default(dtype, generation=generation)
  assert sizes.generation == generation
  assert sizes.grad_c_programs == {"h100": 132, "a100": 108}[generation]  # one per SM
  need = sizes.shared_memory_bytes(dtype)
  assert 0 < need <= SHARED_MEMORY_LIMITS[generation]
  sizes.check_shared_memory(dtype)


def test_shared_memory_estimate_counts_the_pipelined_chunks():
  sizes = GPUBlockSizes(token_block=64, vocab_block=128, hidden_block=64, num_stages=3)
  # logits: 3 stages x (64 + 128) x 64 bf16 = 72 KiB; the f32 logit tile: 32 KiB.
  assert sizes.shared_memory_bytes(jnp.bfloat16) == (3 * 192 * 64 * 2) + 64 * 128 * 4
  # float16 multiplies in f32: dE operand 64 x 128 x 4 + 3 x 128 x 64 x 4 = 128 KiB.
  assert sizes.shared_memory_bytes(jnp.float16) == (64 * 128 * 4 + 3 * 128 * 64 * 4) + 32768


def test_shared_memory_budget_depends_on_the_generation():
  # 192 KiB for bf16: fits the H100's 227 KiB, not the A100's 163 KiB.
  tiles = dict(token_block=128, vocab_block=128, hidden_block=64, num_stages=4)
  assert 163 * 1024 < GPUBlockSizes(**tiles).shared_memory_bytes(jnp.bfloat16) <= 227 * 1024
  GPUBlockSizes(**tiles, generation="h100")
  with pytest.raises(ValueError, match=r"163 KiB of generation='a100'"):
    GPUBlockSizes(**tiles, generation="a100")


def test_oversized_tiles_are_rejected_before_lowering():
  # Lowering on a CPU accepts these; Triton would fail only on the GPU.
  with pytest.raises(ValueError, match=r"token_block=1024, vocab_block=1024.*shared memory"):
    GPUBlockSizes(token_block=1024, vocab_block=1024, hidden_block=1024)
  # Within budget for bf16 at construction, over it for float32 at trace time.
  sizes = GPUBlockSizes(token_block=128, vocab_block=128, hidden_block=64, num_stages=3)
  sizes.check_shared_memory(jnp.bfloat16)  # 160 KiB; 256 KiB for float32
  e = jnp.ones((32, 64), jnp.float32)
  c = jnp.ones((64, 64), jnp.float32)
  with pytest.raises(ValueError, match=r"float32 inputs"):
    cce_jax.linear_cross_entropy(
      e, c, jnp.zeros((32,), jnp.int32), impl="pallas_gpu", interpret=True, block_sizes=sizes
    )


@pytest.mark.parametrize(
  "field, value, error, message",
  [
    ("token_block", 48, ValueError, r"`GPUBlockSizes.token_block` must be a power of two"),
    ("vocab_block", 8, ValueError, r"`GPUBlockSizes.vocab_block` must be a power of two"),
    ("hidden_block", 0, ValueError, r"`GPUBlockSizes.hidden_block` must be a power of two"),
    ("token_block", 64.0, TypeError, r"`GPUBlockSizes.token_block` must be an int"),
    ("num_warps", True, TypeError, r"`GPUBlockSizes.num_warps` must be an int"),
    ("num_warps", 3, ValueError, r"`GPUBlockSizes.num_warps` must be one of"),
    ("num_stages", 0, ValueError, r"`GPUBlockSizes.num_stages` must be >= 1"),
    ("vocab_splits", 0, ValueError, r"`GPUBlockSizes.vocab_splits` must be >= 1"),
    ("grad_c_vocab_block", 24, ValueError, r"`GPUBlockSizes.grad_c_vocab_block` must be a power"),
    ("grad_c_programs", 0, ValueError, r"`GPUBlockSizes.grad_c_programs` must be >= 1"),
    ("grad_c_programs", 2.0, TypeError, r"`GPUBlockSizes.grad_c_programs` must be an int"),
    ("generation", "v100", ValueError, r"`GPUBlockSizes.generation` must be one of"),
  ],
)
def test_bad_block_sizes_name_the_field(field, value, error, message):
  with pytest.raises(error, match=message):
    GPUBlockSizes(**{field: value})


def test_block_sizes_of_the_wrong_type_and_too_small_problems_are_rejected():
  e = jnp.ones((8, 24), jnp.float32)
  labels = jnp.zeros((8,), jnp.int32)
  with pytest.raises(TypeError, match="GPUBlockSizes"):
    cce_jax.linear_cross_entropy(
      e, jnp.ones((40, 24)), labels, impl="pallas_gpu", block_sizes=cce_jax.BlockSizes()
    )
  with pytest.raises(ValueError, match=r"V=10"):
    cce_jax.linear_cross_entropy(
      e, jnp.ones((10, 24)), labels, impl="pallas_gpu", interpret=True, block_sizes=BLOCKS
    )


# ---- on a real GPU -------------------------------------------------------------------------


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("case", PAIRWISE, ids=[case_id(c) for c in PAIRWISE])
@pytest.mark.parametrize("blocks", ["small", "default"])
def test_compiled_kernels_match_the_reference(case, blocks):
  sizes = BLOCKS if blocks == "small" else None
  check_case("pallas_gpu", case, zlib.crc32(case_id(case).encode()), block_sizes=sizes)


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_compiled_kernels_match_xla_on_trained_like_inputs(dtype):
  e, c, labels = synthetic.trained_like_inputs(
    jax.random.key(7), 4096, 512, 32003, jnp.dtype(dtype)
  )

  def grads(impl):
    loss = lambda e, c: cce_jax.linear_cross_entropy(e, c, labels, impl=impl, filter_eps=None)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(e, c)

  (loss, (d_e, d_c)), (loss_xla, (d_e_xla, d_c_xla)) = grads("pallas_gpu"), grads("xla")
  tol = 2e-5 if dtype == "float32" else 1.5e-2
  assert float(loss) == pytest.approx(float(loss_xla), rel=1e-5)
  assert_rel_close("d_e", d_e, np.asarray(d_e_xla, np.float64), tol)
  assert_rel_close("d_c", d_c, np.asarray(d_c_xla, np.float64), tol)
