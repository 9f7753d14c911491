"""Argument checking for the public API: every error names the argument and what was seen.

All checks run at trace time on shapes, dtypes and Python values, except the optional label
range check, which needs the label values (see :func:`check_label_values`).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax import loss_math, target
from cce_jax.options import LossOptions
from cce_jax.tiled import Implementation

REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "xla", "reference", "pallas_gpu", "pallas_tpu", "pallas_mosaic_gpu")
CLASSIFIER_LAYOUTS = ("vd", "dv")
_FLOAT_DTYPES = (jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _describe(x: Any) -> str:
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None:
    return f"{type(x).__name__} {x!r}"
  return f"shape {tuple(shape)} and dtype {dtype}"


def _require_array(name: str, x: Any) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"`{name}` must be an array, got {type(x).__name__}.")


def check_arrays(e: Any, c: Any, labels: Any, bias: Any, classifier_layout: str) -> None:
  """Checks the arrays' ranks, shapes and dtypes.

  Raises:
    TypeError: a non-array, a non-float ``e``/``c``/``bias``, ``e`` and ``c`` of different
      dtypes, or non-integer ``labels``.
    ValueError: inconsistent shapes.
  """
  for name, x in (("e", e), ("c", c), ("labels", labels)):
    _require_array(name, x)
  if e.ndim < 2:
    raise ValueError(f"`e` must have shape (..., T, D) with at least 2 dims, got {_describe(e)}.")
  if c.ndim != 2:
    dims = "(V, D)" if classifier_layout == "vd" else "(D, V)"
    raise ValueError(f"`c` must have shape {dims}, got {_describe(c)}.")
  if not any(e.dtype == d for d in _FLOAT_DTYPES):
    raise TypeError(f"`e` must be float32, bfloat16, float16 or float64, got {_describe(e)}.")
  if c.dtype != e.dtype:
    raise TypeError(
      f"`c` and `e` must have the same dtype, got c {c.dtype} and e {e.dtype}; cast the "
      "classifier to the activations' dtype yourself, `c.astype(e.dtype)` (e.g. float32 "
      "parameters with bfloat16 activations): a silent cast would hide a copy of the whole "
      "classifier."
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"`labels` must be an integer array, got {_describe(labels)}.")
  hidden = e.shape[-1]
  if hidden == 0:
    raise ValueError(f"`e` must have a hidden size D >= 1, got {_describe(e)}.")
  vocab_dim = 0 if classifier_layout == "vd" else 1
  num_classes = c.shape[vocab_dim]
  if c.shape[1 - vocab_dim] != hidden:
    raise ValueError(
      f"`c` (classifier_layout={classifier_layout!r}) must have D={hidden} (the last dim of "
      f"e) on axis {1 - vocab_dim}, got c {_describe(c)} and e {_describe(e)}."
      + (" Did you mean classifier_layout='dv'?" if c.shape[0] == hidden else "")
      + (" Did you mean classifier_layout='vd'?" if c.shape[1] == hidden else "")
    )
  if num_classes == 0:
    raise ValueError(f"`c` must have at least one class, got {_describe(c)}.")
  if tuple(labels.shape) != tuple(e.shape[:-1]):
    raise ValueError(
      f"`labels` must have shape e.shape[:-1] = {tuple(e.shape[:-1])}, got "
      f"{_describe(labels)} (e has {_describe(e)})."
    )
  if bias is not None:
    _require_array("bias", bias)
    if tuple(bias.shape) != (num_classes,):
      raise ValueError(f"`bias` must have shape (V,) = ({num_classes},), got {_describe(bias)}.")
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise TypeError(f"`bias` must be a float array, got {_describe(bias)}.")


def _check_float(name: str, value: Any, *, low: float, high: float, high_open: bool) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
    raise TypeError(f"`{name}` must be a Python float, got {type(value).__name__} ({value!r}).")
  value = float(value)
  above = value >= high if high_open else value > high
  if not math.isfinite(value) or value < low or above:
    bracket = ")" if high_open else "]"
    raise ValueError(f"`{name}` must be in [{low}, {high}{bracket}, got {value}.")
  return value


def check_shift(shift: Any, seq_len: int) -> int:
  """``shift`` as an int in [0, T]; True means 1."""
  if isinstance(shift, bool):
    shift = int(shift)
  if not isinstance(shift, (int, np.integer)):
    raise TypeError(f"`shift` must be an int or bool, got {type(shift).__name__} ({shift!r}).")
  shift = int(shift)
  if not 0 <= shift <= seq_len:
    raise ValueError(
      f"`shift` must be in [0, T] with T={seq_len} (the second-last dim of e), got {shift}."
    )
  return shift


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
  if not isinstance(value, str):
    raise TypeError(
      f"`{name}` must be a str, one of {choices}, got {type(value).__name__} ({value!r})."
    )
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
  return value


def check_bool(name: str, value: Any) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"`{name}` must be a bool, got {type(value).__name__} ({value!r}).")
  return bool(value)


def resolve_filter_eps(filter_eps: Any, dtype) -> float | None:
  """``"auto"`` -> ``finfo(dtype).eps / 32``; None stays None (exact); else a float >= 0."""
  if filter_eps is None:
    return None
  if isinstance(filter_eps, str):
    if filter_eps != "auto":
      raise ValueError(f'`filter_eps` must be a float, "auto" or None, got {filter_eps!r}.')
    return loss_math.default_filter_eps(dtype)
  return _check_float("filter_eps", filter_eps, low=0.0, high=1.0, high_open=False)


def build_options(
  *,
  dtype,
  ignore_index: Any,
  softcap: Any,
  z_loss: Any,
  label_smoothing: Any,
  filter_eps: Any,
  filter_e_grad: Any,
  filter_c_grad: Any,
  sort_vocab: Any,
  classifier_layout: str,
  block_sizes: Any,
  implementation: Implementation,
  interpret: Any = False,
  vocab_axis: str | tuple[str, ...] | None = None,
  platform: str | None = None,
) -> LossOptions:
  """Validates the scalar options and bundles them into the static :class:`LossOptions`.

  ``implementation`` resolves and validates ``block_sizes`` (None: its default for
  ``dtype``); ``interpret`` is validated, and kept only for a Pallas implementation (the
  others ignore it). ``platform``: the platform the computation is compiled for (see
  :func:`compile_platform`), which :func:`check_backend` accepts besides JAX's default backend.
  """
  if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
    raise TypeError(
      f"`ignore_index` must be an int, got {type(ignore_index).__name__} ({ignore_index!r})."
    )
  if not INT32_MIN <= ignore_index <= INT32_MAX:
    raise ValueError(
      f"`ignore_index` must fit in int32 (labels are compared as int32), got {ignore_index}."
    )
  if softcap is not None:
    softcap = _check_float("softcap", softcap, low=0.0, high=math.inf, high_open=True)
    if softcap == 0.0:
      raise ValueError("`softcap` must be positive (or None for no softcap), got 0.0.")
  block_sizes = implementation.resolve_block_sizes(block_sizes, dtype)
  interpret = check_bool("interpret", interpret) and implementation.is_pallas
  if not interpret:
    check_backend(implementation, platform=platform)
  return LossOptions(
    ignore_index=int(ignore_index),
    softcap=softcap,
    z_loss=_check_float("z_loss", z_loss, low=0.0, high=math.inf, high_open=True),
    label_smoothing=_check_float(
      "label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True
    ),
    filter_eps=resolve_filter_eps(filter_eps, dtype),
    filter_e_grad=check_bool("filter_e_grad", filter_e_grad),
    filter_c_grad=check_bool("filter_c_grad", filter_c_grad),
    sort_vocab=check_bool("sort_vocab", sort_vocab),
    classifier_layout=classifier_layout,
    block_sizes=block_sizes,
    interpret=interpret,
    vocab_axis=vocab_axis,
  )


def compile_platform(*arrays: Any) -> str | None:
  """The platform ("gpu", "tpu", "cpu") that ``arrays`` are compiled for: the device of their
  sharding's mesh, else of the abstract mesh in context; None where neither names one.

  Under ``jax.jit`` the inputs' shardings say where the program goes, which need not be JAX's
  default backend: a program lowered for the devices of a GPU or TPU topology on a CPU host
  (``cce_jax.aot``) is compiled for that GPU or TPU.
  """
  for x in arrays:
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    device = None if mesh is None else target.abstract_device(mesh)
    if device is not None:
      return device.platform
  device = target.abstract_device()  # the mesh in context
  return None if device is None else device.platform


def check_backend(
  implementation: Implementation, backend: str | None = None, platform: str | None = None
) -> None:
  """Raises ValueError when ``implementation``'s compiled kernels run neither on ``backend``
  (default :func:`cce_jax.target.platform`: the devices of the mesh in context when compiling
  ahead of time for another platform, else JAX's default backend) nor on ``platform`` (that
  of the inputs' shardings, :func:`compile_platform`, when known) nor on JAX's default
  backend, naming ``impl``, the backend and ``interpret=True``, before JAX fails deep in the
  lowering ("Only interpret mode is supported on CPU backend")."""
  from_mesh = backend is None and target.device_kind() is not None
  backend = backend or target.platform()
  backends = implementation.backends
  if backends is None or backend in backends:
    _check_device_kind(implementation, target.device_kind() if from_mesh else None, backend)
    return
  # Never stricter than JAX's default backend alone: the inputs' platform, or the default
  # backend where a mesh of host devices is in context (a CUDA export from a CPU host on
  # JAX 0.10), may name what the program is really compiled for.
  host = jax.default_backend() if from_mesh else None
  for other in (platform, host):
    if other in backends:
      _check_device_kind(implementation, None, other)
      return
  where = (
    f"the mesh in context compiles for {backend!r} devices"
    if from_mesh
    else f"JAX's default backend is {backend!r}"
  )
  raise ValueError(
    f"`impl`={implementation.name!r} compiles its kernels for the {' or '.join(backends)} "
    f"backend only, but {where}: pass `interpret=True` to run "
    "them in the Pallas interpreter (slow; for tests), or use impl='xla' (every backend)."
    + (
      ""
      if from_mesh
      else " To compile ahead of time for another platform, trace under jax.set_mesh(a mesh "
      "of its devices) (cce_jax.aot)."
    )
  )


def _check_device_kind(implementation: Implementation, kind: str | None, backend: str) -> None:
  """Raises ValueError when the device kind compiled for (``kind``; None: that of JAX's first
  device of ``backend``) is one of ``implementation.unsupported_kinds``."""
  if not implementation.unsupported_kinds:
    return
  if kind is None:
    try:
      kind = jax.devices(backend)[0].device_kind
    except RuntimeError:  # not this host's backend: nothing to compare
      return
  if any(re.search(pattern, kind.lower()) for pattern in implementation.unsupported_kinds):
    raise ValueError(
      f"`impl`={implementation.name!r} cannot compile its kernels for {kind!r} devices "
      "(that generation lacks what they need); use impl='xla' (every backend)."
    )


def _label_error(labels: np.ndarray, num_classes: int, ignore_index: int, shift: int) -> str | None:
  bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
  bad[..., :shift] = False  # never targets: position i predicts labels[..., i + shift]
  if not bad.any():
    return None
  position = tuple(int(i) for i in np.argwhere(bad)[0])
  return (
    f"`labels` holds {int(bad.sum())} value(s) outside [0, V) = [0, {num_classes}) that are "
    f"not ignore_index={ignore_index}; the first is {int(labels[position])} at index "
    f"{position}."
  )


def _raise_label_error(labels: np.ndarray, num_classes: int, ignore_index: int, shift: int):
  message = _label_error(np.array(labels), num_classes, ignore_index, shift)
  if message is not None:
    raise ValueError(message)


def check_label_values(labels: Any, num_classes: int, ignore_index: int, shift: int) -> None:
  """Raises ValueError for a target label outside [0, V) that is not ``ignore_index``.

  Only labels that are targets count (``labels[..., shift:]``); the index in the message is
  into ``labels``. Concrete labels are checked at once. Traced labels (under ``jax.jit``) are
  checked when the computation runs, through ``jax.debug.callback``: the ValueError then reaches
  the caller wrapped in a ``jax.errors.JaxRuntimeError`` that carries the same message.
  """
  if isinstance(labels, jax.core.Tracer):
    # Static values are bound here: debug.callback would turn keyword arguments into arrays.
    check = functools.partial(
      _raise_label_error, num_classes=num_classes, ignore_index=ignore_index, shift=shift
    )
    jax.debug.callback(check, labels)
  else:
    _raise_label_error(labels, num_classes, ignore_index, shift)


def labels_as_int32(labels: Any, num_classes: int) -> Any:
  """``labels`` as int32, values outside the int32 range mapped to ``num_classes``.

  The one place where labels of every integer dtype become int32. Labels whose dtype fits in
  int32 (int8/16/32, uint8/16) are returned as they are (the loss casts them exactly). Wider
  dtypes (uint32, and int64/uint64, real under x64 or as NumPy arrays) would wrap in a plain
  cast: the uint32 label ``2**32 - 100`` would become ``-100`` (``ignore_index``: the token
  silently dropped) and the int64 ``2**32 + k`` the valid class ``k``. ``num_classes`` is out
  of range, so such a label gets the NaN loss of every other bad label (``check_labels``
  reports its true value). Concrete labels are mapped in NumPy (``jnp.asarray`` would already
  wrap int64 without x64); traced ones in JAX.
  """
  info = jnp.iinfo(labels.dtype)  # jnp: also the narrow int4/uint4 of ml_dtypes
  too_low, too_high = info.min < INT32_MIN, info.max > INT32_MAX
  if not (too_low or too_high):
    return labels
  xp = jnp if isinstance(labels, jax.core.Tracer) else np
  values = labels if xp is jnp else np.asarray(labels)
  beyond = values > INT32_MAX  # the bounds are compared only where the dtype holds them
  if too_low:
    beyond = beyond | (values < INT32_MIN)
  return xp.where(beyond, num_classes, values).astype(xp.int32)


def check_weights(weights: Any, labels: Any) -> None:
  """Checks per-token ``weights``: an array of ``labels.shape``, float or bool.

  Raises:
    TypeError: a non-array, or a dtype that is neither float nor bool (integer weights are
      refused: cast them, e.g. ``weights.astype(jnp.float32)``).
    ValueError: a shape other than ``labels.shape``.
  """
  _require_array("weights", weights)
  dtype = weights.dtype
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.bool_)):
    raise TypeError(
      f"`weights` must be a float array (or bool, as optax's `where`), got {_describe(weights)};"
      " cast it, e.g. weights.astype(jnp.float32)."
    )
  if tuple(weights.shape) != tuple(labels.shape):
    raise ValueError(
      f"`weights` must have the shape of `labels` {tuple(labels.shape)} (one weight per "
      f"label, shifted with them under `shift`), got {_describe(weights)}."
    )
