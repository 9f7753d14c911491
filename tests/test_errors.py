"""Bad arguments to ``linear_cross_entropy`` and ``filter_stats``: the right error, naming it.

Every case of the table runs eagerly and inside ``jax.jit`` (arrays traced): the checks look at
shapes, dtypes and Python values only, so they must fire at trace time either way. The label
range check (``check_labels``) is the one check on values; its tests are at the end.
"""

from __future__ import annotations

import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cce_jax
from cce_jax import BlockSizes

B, T, D, V = 2, 5, 8, 11
FUNCTIONS = {
  "linear_cross_entropy": cce_jax.linear_cross_entropy,
  "filter_stats": cce_jax.filter_stats,
}


def _inputs(seed: int = 0) -> dict:
  """Fresh valid arrays: e (B, T, D) f32, c (V, D) f32, labels (B, T) int32 in [0, V)."""
  ke, kc, kl = jax.random.split(jax.random.key(seed), 3)
  return {
    "e": jax.random.normal(ke, (B, T, D), jnp.float32),
    "c": jax.random.normal(kc, (V, D), jnp.float32),
    "labels": jax.random.randint(kl, (B, T), 0, V, jnp.int32),
  }


def _call(fn, args: dict, *, jit: bool):
  """fn(e, c, labels, **rest); under ``jit`` the arrays (and bias) are traced arguments."""
  args = dict(args)
  e, c, labels, bias = args.pop("e"), args.pop("c"), args.pop("labels"), args.pop("bias", None)
  if jit:
    return jax.jit(lambda e, c, labels, bias: fn(e, c, labels, bias=bias, **args))(
      e, c, labels, bias
    )
  return fn(e, c, labels, bias=bias, **args)


_BOOL_OPTIONS = (
  "filter_e_grad",
  "filter_c_grad",
  "return_lse",
  "check_labels",
  "interpret",
  "sort_vocab",
)

# (id, change, exception, match). ``change`` maps an argument to its bad value, or to a function
# of the valid inputs that builds it. A case runs for each function that takes all its arguments.
CASES = [
  # --- arrays: kind, rank, dtype, shape
  ("e_list", {"e": lambda a: a["e"].tolist()}, TypeError, r"`e` must be an array.*list"),
  ("c_list", {"c": lambda a: a["c"].tolist()}, TypeError, r"`c` must be an array.*list"),
  ("labels_list", {"labels": lambda a: a["labels"].tolist()}, TypeError, r"`labels` must be an"),
  ("e_1d", {"e": lambda a: a["e"][0, 0]}, ValueError, r"`e` must have shape.*\(8,\)"),
  ("e_int", {"e": lambda a: a["e"].astype(jnp.int32)}, TypeError, r"`e` must be float.*int32"),
  ("c_3d", {"c": lambda a: a["c"][None]}, ValueError, r"`c` must have shape \(V, D\)"),
  (
    "c_3d_dv",
    {"c": lambda a: a["c"].T[None], "classifier_layout": "dv"},
    ValueError,
    r"`c` must have shape \(D, V\)",
  ),
  ("c_wrong_d_vd", {"c": lambda a: a["c"][:, :7]}, ValueError, r"`c`.*must have D=8"),
  (
    "c_wrong_d_dv",
    {"c": lambda a: a["c"][:, :7].T, "classifier_layout": "dv"},
    ValueError,
    r"`c`.*must have D=8",
  ),
  (
    "c_transposed_vd",
    {"c": lambda a: a["c"].T},
    ValueError,
    r"`c`.*Did you mean classifier_layout='dv'\?",
  ),
  (
    "c_transposed_dv",
    {"classifier_layout": "dv"},
    ValueError,
    r"`c`.*Did you mean classifier_layout='vd'\?",
  ),
  ("c_no_classes", {"c": lambda a: a["c"][:0]}, ValueError, r"`c` must have at least one class"),
  (
    "c_dtype",
    {"c": lambda a: a["c"].astype(jnp.bfloat16)},
    TypeError,
    r"`c` and `e` must have the same dtype.*bfloat16",
  ),
  (
    "labels_float",
    {"labels": lambda a: a["labels"].astype(jnp.float32)},
    TypeError,
    r"`labels` must be an integer array.*float32",
  ),
  (
    "labels_bool",
    {"labels": lambda a: a["labels"] > 3},
    TypeError,
    r"`labels` must be an integer array.*bool",
  ),
  (
    "labels_short",
    {"labels": lambda a: a["labels"][:, :4]},
    ValueError,
    r"`labels` must have shape e\.shape\[:-1\] = \(2, 5\).*\(2, 4\)",
  ),
  (
    "labels_transposed",
    {"labels": lambda a: a["labels"].T},
    ValueError,
    r"`labels` must have shape",
  ),
  (
    "labels_flat",
    {"labels": lambda a: a["labels"].reshape(-1)},
    ValueError,
    r"`labels` must have shape",
  ),
  (
    "bias_long",
    {"bias": lambda a: jnp.zeros((V + 1,), jnp.float32)},
    ValueError,
    r"`bias` must have shape \(V,\) = \(11,\).*\(12,\)",
  ),
  (
    "bias_2d",
    {"bias": lambda a: jnp.zeros((1, V), jnp.float32)},
    ValueError,
    r"`bias` must have shape",
  ),
  (
    "bias_int",
    {"bias": lambda a: jnp.zeros((V,), jnp.int32)},
    TypeError,
    r"`bias` must be a float array.*int32",
  ),
  ("bias_list", {"bias": [0.0] * V}, TypeError, r"`bias` must be an array"),
  # --- scalar options
  ("ignore_index_float", {"ignore_index": -100.0}, TypeError, r"`ignore_index` must be an int"),
  ("ignore_index_bool", {"ignore_index": True}, TypeError, r"`ignore_index` must be an int"),
  (
    "ignore_index_beyond_int32",
    {"ignore_index": 2**40},
    ValueError,
    r"`ignore_index` must fit in int32",
  ),
  ("softcap_zero", {"softcap": 0.0}, ValueError, r"`softcap` must be positive"),
  ("softcap_negative", {"softcap": -1.0}, ValueError, r"`softcap` must be in .*got -1\.0"),
  ("softcap_inf", {"softcap": math.inf}, ValueError, r"`softcap` must be in .*got inf"),
  ("softcap_nan", {"softcap": math.nan}, ValueError, r"`softcap` must be in .*got nan"),
  ("softcap_str", {"softcap": "30"}, TypeError, r"`softcap` must be a Python float.*str"),
  ("softcap_bool", {"softcap": True}, TypeError, r"`softcap` must be a Python float.*bool"),
  ("z_loss_negative", {"z_loss": -1e-4}, ValueError, r"`z_loss` must be in .*got -0\.0001"),
  ("z_loss_nan", {"z_loss": math.nan}, ValueError, r"`z_loss` must be in .*got nan"),
  ("z_loss_str", {"z_loss": "1e-4"}, TypeError, r"`z_loss` must be a Python float.*str"),
  (
    "label_smoothing_one",
    {"label_smoothing": 1.0},
    ValueError,
    r"`label_smoothing` must be in \[0\.0, 1\.0\).*got 1\.0",
  ),
  (
    "label_smoothing_negative",
    {"label_smoothing": -0.1},
    ValueError,
    r"`label_smoothing` must be in .*got -0\.1",
  ),
  (
    "label_smoothing_str",
    {"label_smoothing": "0.1"},
    TypeError,
    r"`label_smoothing` must be a Python float",
  ),
  ("filter_eps_negative", {"filter_eps": -1e-3}, ValueError, r"`filter_eps` must be in .*-0\.001"),
  ("filter_eps_above_one", {"filter_eps": 1.5}, ValueError, r"`filter_eps` must be in .*1\.5"),
  (
    "filter_eps_bad_str",
    {"filter_eps": "fast"},
    ValueError,
    r"`filter_eps` must be a float, \"auto\" or None, got 'fast'",
  ),
  ("filter_eps_bool", {"filter_eps": True}, TypeError, r"`filter_eps` must be a Python float"),
  *(
    (f"{name}_{value!r}", {name: value}, TypeError, rf"`{name}` must be a bool")
    for name in _BOOL_OPTIONS
    for value in (1, "yes")
  ),
  ("reduction_avg", {"reduction": "avg"}, ValueError, r"`reduction` must be one of .*'avg'"),
  ("reduction_int", {"reduction": 1}, TypeError, r"`reduction` must be a str"),
  ("impl_none", {"impl": None}, TypeError, r"`impl` must be a str"),
  (
    "classifier_layout_none",
    {"classifier_layout": None},
    TypeError,
    r"`classifier_layout` must be a str",
  ),
  (
    "hidden_zero",
    {"e": lambda a: jnp.ones((2, 5, 0)), "c": lambda a: jnp.ones((V, 0))},
    ValueError,
    r"`e` must have a hidden size D >= 1",
  ),
  ("impl_cuda", {"impl": "cuda"}, ValueError, r"`impl` must be one of .*'cuda'"),
  (
    "block_sizes_for_xla_on_pallas",
    {"impl": "pallas_gpu", "interpret": True, "block_sizes": BlockSizes(8, 8)},
    TypeError,
    r"`block_sizes` must be a pallas_kernels\.gpu.*for this `impl`, got BlockSizes",
  ),
  (
    "classifier_layout_upper",
    {"classifier_layout": "VD"},
    ValueError,
    r"`classifier_layout` must be one of .*'VD'",
  ),
  ("shift_negative", {"shift": -1}, ValueError, r"`shift` must be in \[0, T\] with T=5.*-1"),
  ("shift_beyond_t", {"shift": T + 1}, ValueError, r"`shift` must be in \[0, T\].*got 6"),
  ("shift_float", {"shift": 1.5}, TypeError, r"`shift` must be an int or bool.*1\.5"),
  ("shift_str", {"shift": "1"}, TypeError, r"`shift` must be an int or bool"),
  (
    "block_sizes_tuple",
    {"block_sizes": (8, 8)},
    TypeError,
    r"`block_sizes` must be a cce_jax\.BlockSizes.*tuple",
  ),
  (
    "block_sizes_dict",
    {"block_sizes": {"token_block": 8}},
    TypeError,
    r"`block_sizes` must be a cce_jax\.BlockSizes.*dict",
  ),
]


def _case_params():
  for case in CASES:
    (case_id, change, exc, match), marks = (
      (case.values, case.marks) if hasattr(case, "values") else (case, ())
    )
    for fn_name, fn in FUNCTIONS.items():
      if set(change) <= set(inspect.signature(fn).parameters):
        yield pytest.param(fn_name, change, exc, match, id=f"{fn_name}-{case_id}", marks=marks)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(("fn_name", "change", "exc", "match"), list(_case_params()))
def test_bad_input_raises_naming_it(fn_name, change, exc, match, jit):
  args = _inputs()
  args.update({k: v(args) if callable(v) else v for k, v in change.items()})
  with pytest.raises(exc, match=match):
    _call(FUNCTIONS[fn_name], args, jit=jit)


def test_every_case_runs_for_linear_cross_entropy():
  """Each case of the table applies to linear_cross_entropy (no case silently drops out)."""
  ids = [p.id for p in _case_params()]
  assert len({i for i in ids if i.startswith("linear_cross_entropy-")}) == len(CASES)
  assert any(i.startswith("filter_stats-") for i in ids)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("fn_name", list(FUNCTIONS))
def test_valid_inputs_pass(fn_name, layout, jit):
  """The unmodified inputs of the table are valid, so each case fails for its own change."""
  args = _inputs()
  if layout == "dv":
    args["c"] = args["c"].T
  out = _call(FUNCTIONS[fn_name], {**args, "classifier_layout": layout}, jit=jit)
  for leaf in jax.tree.leaves(out):
    assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.parametrize(
  ("args", "exc", "match"),
  [
    ((0, 8), ValueError, r"`BlockSizes\.token_block` must be positive, got 0"),
    ((8, -1), ValueError, r"`BlockSizes\.vocab_block` must be positive, got -1"),
    ((8.0, 8), TypeError, r"`BlockSizes\.token_block` must be an int, got float"),
    ((True, 8), TypeError, r"`BlockSizes\.token_block` must be an int, got bool"),
    ((8, "8"), TypeError, r"`BlockSizes\.vocab_block` must be an int, got str"),
    ((8, None), TypeError, r"`BlockSizes\.vocab_block` must be an int, got NoneType"),
  ],
  ids=["token_zero", "vocab_negative", "token_float", "token_bool", "vocab_str", "vocab_none"],
)
def test_bad_block_sizes_raise_naming_the_field(args, exc, match):
  with pytest.raises(exc, match=match):
    BlockSizes(*args)


@pytest.mark.parametrize(
  ("make", "exc", "match"),
  [
    (lambda a: cce_jax.linear_cross_entropy(**a, block_sizes=(8, 8)), TypeError, r"`block_sizes`"),
    (lambda a: BlockSizes(0, 8), ValueError, r"`BlockSizes\.token_block`"),
    (lambda a: BlockSizes(8.0, 8), TypeError, r"`BlockSizes\.token_block`"),
  ],
  ids=["block_sizes_tuple", "block_sizes_value", "block_sizes_type"],
)
def test_argument_named_in_backticks(make, exc, match):
  with pytest.raises(exc, match=match):
    make(_inputs())


# --- check_labels: the one check on values


def _bad_labels_message(value: int, index: tuple[int, ...], count: int = 1) -> str:
  return re.escape(
    f"`labels` holds {count} value(s) outside [0, V) = [0, {V}) that are not "
    f"ignore_index=-100; the first is {value} at index {index}."
  )


@pytest.mark.parametrize("value", [V, -1, 2**20])
def test_check_labels_concrete_names_value_and_index(value):
  args = _inputs()
  labels = args.pop("labels").at[1, 3].set(value)
  with pytest.raises(ValueError, match=_bad_labels_message(value, (1, 3))):
    cce_jax.linear_cross_entropy(**args, labels=labels, check_labels=True)


def test_check_labels_reports_count_and_first_in_row_major_order():
  args = _inputs()
  labels = args.pop("labels").at[1, 0].set(V + 1).at[0, 4].set(V)
  with pytest.raises(ValueError, match=_bad_labels_message(V, (0, 4), count=2)):
    cce_jax.linear_cross_entropy(**args, labels=labels, check_labels=True)


@pytest.mark.parametrize("value", [V, -1])
def test_check_labels_traced_raises_runtime_error_with_message(value):
  args = _inputs()
  labels = args.pop("labels").at[1, 3].set(value)
  fn = jax.jit(
    lambda labels: cce_jax.linear_cross_entropy(**args, labels=labels, check_labels=True)
  )
  with pytest.raises(jax.errors.JaxRuntimeError, match=_bad_labels_message(value, (1, 3))):
    jax.block_until_ready(fn(labels))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
  ("ignore_index", "ignored_label"), [(-100, -100), (-1, -1), (V, V)], ids=["default", "-1", "V"]
)
def test_check_labels_accepts_ignore_index(ignore_index, ignored_label, jit):
  args = _inputs()
  labels = args.pop("labels").at[0, 1].set(ignored_label).at[1, 4].set(ignored_label)
  fn = lambda labels, check: cce_jax.linear_cross_entropy(
    **args, labels=labels, ignore_index=ignore_index, check_labels=check
  )
  if jit:
    fn = jax.jit(fn, static_argnames="check")
  checked = jax.block_until_ready(fn(labels, check=True))
  assert np.isfinite(checked)
  np.testing.assert_array_equal(checked, fn(labels, check=False))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_check_labels_with_shift_ignores_first_position(jit):
  """With shift=1, labels[..., 0] is never a target, so an out-of-range value there is fine."""
  args = _inputs()
  labels = args.pop("labels").at[:, 0].set(V)
  fn = lambda labels, shift: cce_jax.linear_cross_entropy(
    **args, labels=labels, shift=shift, check_labels=True
  )
  if jit:
    fn = jax.jit(fn, static_argnames="shift")
  assert np.isfinite(jax.block_until_ready(fn(labels, shift=1)))
  # The same labels without the shift are caught: the check above did look at the labels.
  with pytest.raises(
    jax.errors.JaxRuntimeError if jit else ValueError, match=_bad_labels_message(V, (0, 0), 2)
  ):
    jax.block_until_ready(fn(labels, shift=0))


def test_check_labels_with_shift_reports_index_into_labels():
  args = _inputs()
  labels = args.pop("labels").at[1, 3].set(V)
  with pytest.raises(ValueError, match=_bad_labels_message(V, (1, 3))):
    cce_jax.linear_cross_entropy(**args, labels=labels, shift=1, check_labels=True)


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu", "pallas_mosaic_gpu"])
def test_missing_implementation_module(monkeypatch, impl):
  """An installation without a Pallas package says so, naming ``impl``."""
  monkeypatch.setitem(cce_jax.dispatch._MODULES, impl, "pallas_kernels.no_such_module")
  with pytest.raises(NotImplementedError, match=rf"`impl`='{impl}' is not available"):
    cce_jax.linear_cross_entropy(**_inputs(), impl=impl)


@pytest.mark.parametrize(("impl", "backend"), [("pallas_gpu", "gpu"), ("pallas_tpu", "tpu")])
@pytest.mark.parametrize("fn_name", FUNCTIONS)
@pytest.mark.parametrize("jit", [False, True])
def test_pallas_on_the_wrong_backend_names_impl_backend_and_interpret(impl, backend, fn_name, jit):
  """Checked up front (it used to fail in the lowering with "Only interpret mode is supported
  on CPU backend")."""
  if jax.default_backend() == backend:
    pytest.skip(f"{impl} compiles on this {backend} backend")
  args = _inputs()
  args["e"], args["c"] = jnp.ones((B, T, 16)), jnp.ones((40, 16))  # Pallas's smallest tiles
  match = (
    rf"`impl`='{impl}' compiles its kernels for the {backend} backend only, but JAX's "
    rf"default backend is '{jax.default_backend()}': pass `interpret=True`"
  )
  with pytest.raises(ValueError, match=match):
    _call(FUNCTIONS[fn_name], {**args, "impl": impl}, jit=jit)
