"""Helpers shared by the loss tests: numeric comparisons, a jaxpr walker and the option matrix.

The option matrix (``OPTION_SPACE``) is what every implementation is checked on against the
float64 reference (``reference64``): ``PAIRWISE`` covers every pair of option values,
``SINGLE_OPTION`` every value alone, ``FULL_CROSS_PRODUCT`` everything (``--runslow``).
``tests/test_option_matrix.py``, the Pallas test files and ``tests/multidevice`` use it.
"""

from __future__ import annotations

import itertools

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import reference64

import cce_jax


def relative_error(actual, expected) -> float:
  """||actual - expected|| / ||expected|| in float64 (absolute when expected is 0)."""
  actual = np.asarray(actual, dtype=np.float64)
  expected = np.asarray(expected, dtype=np.float64)
  scale = np.linalg.norm(expected)
  diff = np.linalg.norm(actual - expected)
  return float(diff / scale) if scale > 0 else float(diff)


def assert_rel_close(name: str, actual, expected, tol: float) -> None:
  """Asserts a finite ``actual`` within ``tol`` relative (norm) error of ``expected``."""
  actual = np.asarray(actual, dtype=np.float64)
  assert actual.shape == np.shape(expected), f"{name}: shape {actual.shape} != {np.shape(expected)}"
  assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
  err = relative_error(actual, expected)
  assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


def primitive_names(jaxpr) -> list[str]:
  """Every primitive in ``jaxpr`` and, recursively, in the jaxprs inside its equations (with
  repetitions, in order)."""
  names = [eqn.primitive.name for eqn in jaxpr.eqns]
  for sub in jax.extend.core.subjaxprs(jaxpr):
    names += primitive_names(sub)
  return names


# ---- the option matrix ---------------------------------------------------------------------


OPTION_SPACE = {
  "dtype": ("float32", "bfloat16", "float16"),
  "reduction": ("mean", "sum", "none"),
  "ignored": ("none", "some", "all"),
  "ignore_index": (-100, 3),
  "shift": (0, 1, 2),
  "softcap": (None, 4.0),
  "z_loss": (0.0, 0.05),
  "label_smoothing": (0.0, 0.2),
  "return_lse": (False, True),
  "bias": (False, True),
  "classifier_layout": ("vd", "dv"),
  "sort_vocab": (True, False),
  "weights": ("none", "float", "bool"),
}
# Tolerances on ||out - ref|| / ||ref||: f32 accumulation; bf16/f16 outputs are rounded to
# 8/11 bits and the bf16 backward multiplies in bf16.
TOLERANCE = {"float32": 2e-5, "bfloat16": 1.5e-2, "float16": 4e-3}
# Ragged everywhere: tokens 2 x 13, D = 24, V = 75, with 8 x 32 tiles.
BATCH, SEQ_LEN, HIDDEN, NUM_CLASSES = 2, 13, 24, 75
SMALL_BLOCKS = cce_jax.BlockSizes(token_block=8, vocab_block=32)


def pairwise_cases(space: dict[str, tuple]) -> list[dict]:
  """A small set of cases in which every pair of values of any two options occurs (greedy)."""
  names = list(space)
  uncovered = {
    (i, a, j, b)
    for i, j in itertools.combinations(range(len(names)), 2)
    for a in range(len(space[names[i]]))
    for b in range(len(space[names[j]]))
  }

  def newly_covered(chosen: dict[int, int], k: int, value: int) -> int:
    pairs = (
      (min(k, m), value if k < m else v, max(k, m), v if k < m else value)
      for m, v in chosen.items()
    )
    return sum(pair in uncovered for pair in pairs)

  cases = []
  while uncovered:
    i, a, j, b = min(uncovered)
    chosen = {i: a, j: b}
    for k in range(len(names)):
      if k not in chosen:
        options = range(len(space[names[k]]))
        chosen[k] = max(options, key=lambda value, k=k: newly_covered(chosen, k, value))
    uncovered -= {
      (p, chosen[p], q, chosen[q]) for p, q in itertools.combinations(range(len(names)), 2)
    }
    cases.append({names[k]: space[names[k]][v] for k, v in chosen.items()})
  return cases


def case_id(case: dict) -> str:
  """The case's test id, also the source of its seed (``zlib.crc32`` of it)."""
  return "-".join(f"{k}={v}" for k, v in case.items())


def make_inputs(
  seed: int,
  case: dict,
  batch: int = BATCH,
  seq_len: int = SEQ_LEN,
  num_classes: int = NUM_CLASSES,
):
  """Fresh random inputs for one case: e, c, labels, bias in the case's dtype, and the
  random weights (numpy) of the per-token loss and lse in the objective."""
  rng = np.random.default_rng(seed)
  dtype = jnp.dtype(case["dtype"])
  # Nonzero means (as real hidden states have) make the uniform smoothing terms, which
  # scale with sum_n g_n e_n and sum_v c_v, visible in the gradients.
  e = (rng.normal(size=(batch, seq_len, HIDDEN)) + 0.5).astype(np.float32)
  c = (rng.normal(size=(num_classes, HIDDEN)) * 0.6 + 0.2).astype(np.float32)
  if case["classifier_layout"] == "dv":
    c = np.ascontiguousarray(c.T)
  labels = rng.integers(0, num_classes, size=(batch, seq_len)).astype(np.int32)
  if case["ignored"] == "some":
    labels[rng.random(labels.shape) < 0.3] = case["ignore_index"]
  elif case["ignored"] == "all":
    labels[:] = case["ignore_index"]
  bias = rng.normal(size=(num_classes,)).astype(np.float32) if case["bias"] else None
  out_shape = (batch, seq_len - case["shift"])
  loss_weights = rng.normal(size=out_shape) if case["reduction"] == "none" else None
  lse_weights = rng.normal(size=out_shape) * 0.1 if case["return_lse"] else None
  cast = lambda x: None if x is None else jnp.asarray(x, dtype)
  return cast(e), cast(c), jnp.asarray(labels), cast(bias), loss_weights, lse_weights


def make_weights(seed: int, case: dict, batch: int = BATCH, seq_len: int = SEQ_LEN):
  """The case's per-token ``weights`` (shape (batch, seq_len)), or None for "none": "float"
  draws from [-0.5, 2) in the case's dtype with about one in five exactly 0, "bool" is
  optax's ``where`` mask with about one in three False."""
  kind = case.get("weights", "none")
  if kind == "none":
    return None
  rng = np.random.default_rng([seed, 15])
  if kind == "bool":
    return jnp.asarray(rng.random((batch, seq_len)) > 0.3)
  weights = rng.uniform(-0.5, 2.0, size=(batch, seq_len))
  weights[rng.random(weights.shape) < 0.2] = 0.0
  return jnp.asarray(weights, case["dtype"])


def check_case(
  impl: str,
  case: dict,
  seed: int,
  block_sizes=SMALL_BLOCKS,
  interpret: bool = False,
  grad_in_forward: bool = False,
) -> None:
  """Loss, lse and gradients of ``impl`` on ``case`` against the float64 reference.

  The Pallas test files call this with their own ``block_sizes`` and ``interpret=True``;
  ``tests/test_grad_in_forward.py`` with ``grad_in_forward=True``.
  """
  e, c, labels, bias, loss_weights, lse_weights = make_inputs(seed, case)
  weights = make_weights(seed, case)
  float_weights = weights is not None and weights.dtype != jnp.bool_
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
    )
  }
  expected = reference64.reference(
    e,
    c,
    labels,
    bias,
    loss_weights=loss_weights,
    lse_weights=lse_weights,
    weights=weights,
    **options,
  )

  def scalar(e, c, bias, float_weights):
    out = cce_jax.linear_cross_entropy(
      e,
      c,
      labels,
      bias=bias,
      weights=weights if float_weights is None else float_weights,
      return_lse=case["return_lse"],
      impl=impl,
      filter_eps=None,
      block_sizes=block_sizes,
      sort_vocab=case["sort_vocab"],
      interpret=interpret,
      **({"grad_in_forward": True} if grad_in_forward else {}),
      **options,
    )
    loss, lse = out if case["return_lse"] else (out, None)
    lw = None if loss_weights is None else jnp.asarray(loss_weights, jnp.float32)
    hw = None if lse_weights is None else jnp.asarray(lse_weights, jnp.float32)
    return reference64.objective(loss, lse, lw, hw), (loss, lse)

  grad_fn = jax.jit(jax.value_and_grad(scalar, argnums=(0, 1, 2, 3), has_aux=True))
  (_, (loss, lse)), (d_e, d_c, d_bias, d_weights) = grad_fn(
    e, c, bias, weights if float_weights else None
  )

  tol = TOLERANCE[case["dtype"]]
  loss_tol = 2e-5 if case["dtype"] == "float32" else 1e-3  # logits accumulate in f32 anyway
  chex.assert_type(loss, jnp.float32)
  chex.assert_shape(loss, expected["loss"].shape)
  assert_rel_close("loss", loss, expected["loss"], loss_tol)
  if case["return_lse"]:
    chex.assert_shape(lse, expected["lse"].shape)
    assert_rel_close("lse", lse, expected["lse"], loss_tol)
  chex.assert_equal_shape([d_e, e])
  chex.assert_equal_shape([d_c, c])
  chex.assert_type([d_e, d_c], e.dtype)
  assert_rel_close("d_e", d_e, expected["d_e"], tol)
  assert_rel_close("d_c", d_c, expected["d_c"], tol)
  if bias is not None:
    chex.assert_type(d_bias, bias.dtype)
    assert_rel_close("d_bias", d_bias, expected["d_bias"], tol)
  if float_weights:
    chex.assert_type(d_weights, weights.dtype)
    assert_rel_close("d_weights", d_weights, expected["d_weights"], tol)


PAIRWISE = pairwise_cases(OPTION_SPACE)
DEFAULT_CASE = {name: values[0] for name, values in OPTION_SPACE.items()}
# Every non-default value of every option alone, in float32 where the tolerance is tight.
SINGLE_OPTION = [
  {**DEFAULT_CASE, name: value, "dtype": value if name == "dtype" else "float32"}
  for name, values in OPTION_SPACE.items()
  for value in values[1:]
] + [DEFAULT_CASE]
FULL_CROSS_PRODUCT = [
  dict(zip(OPTION_SPACE, values, strict=True))
  for values in itertools.product(*OPTION_SPACE.values())
]


def require_gpu_aot() -> None:
  """Skips the calling test unless deviceless GPU compiles can run here: the CUDA plugin and
  its tools installed (the `gpu-aot` extra; the skip says what is missing) and JAX on CPU."""
  from cce_jax.aot import gpu

  try:
    gpu.require_plugin()
  except gpu.GpuAotUnavailable as error:
    pytest.skip(str(error))
  if jax.default_backend() != "cpu":
    pytest.skip("deviceless GPU compiles run with JAX_PLATFORMS=cpu")


def skipped_softmax_grad(e, c, labels, skip, order, tile: int):
  """The float64 softmax gradient of the "sum" loss (unit cotangent) and which of its
  entries a skip table drops.

  Args:
    e: (N, D), c: (V, D), labels: (N,) int, all classes in range.
    skip: (token blocks, vocabulary blocks) bool, the skip table of ``tile x tile`` tiles.
    order: (V,) the classes in the order the tiles visit them (tile column = position // tile).

  Returns:
    ``(dx, dropped)``: dx (N, V) float64 = p - onehot(labels); dropped (N, V) bool.
  """
  num_tokens = e.shape[0]
  column_of_class = np.argsort(np.asarray(order))  # the visit position of each class
  dropped = skip[np.arange(num_tokens)[:, None] // tile, column_of_class[None, :] // tile]
  z = np.asarray(e, np.float64) @ np.asarray(c, np.float64).T
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  dx = p.copy()
  dx[np.arange(num_tokens), np.asarray(labels)] -= 1.0
  return dx, dropped
