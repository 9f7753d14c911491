"""Token- and vocabulary-parallel loss over a device mesh.

Two ways in, both through :func:`cce_jax.linear_cross_entropy`:

* Inside a user's ``jax.shard_map``, ``vocab_axis=`` names the mesh axis (or axes) over which
  ``c`` is split along the vocabulary in equal contiguous slices, device ``i`` of the axis
  holding classes ``[i * V_local, (i + 1) * V_local)``; ``labels`` hold global class ids.
  ``cce_jax.differentiable`` combines the per-shard statistics across the axis.
  ``token_axes=`` there makes "mean"/"sum" reduce over those axes too (psum of the sum and of
  the count of non-ignored tokens).
* Under ``jax.jit`` (or eagerly) with ``mesh=``: :func:`run_sharded` runs the loss per device
  through ``jax.shard_map``: the leading axis of ``e``/``labels`` is split over
  ``token_axes``, ``c`` (and ``bias``) over ``vocab_axis`` along the vocabulary, and "mean"
  divides by the global count of non-ignored tokens.

Contract for mesh axis types (``jax.make_mesh`` defaults to ``AxisType.Explicit`` on jax
0.10.2): on a mesh with Explicit axes the inputs are first resharded to the layout above with
``jax.sharding.reshard`` (a no-op when they already have it), because ``shard_map`` rejects
Explicit-typed inputs that are placed otherwise; on Auto axes ``shard_map`` reshards them
itself. Both give the same numbers. When the placement of both ``e`` and ``labels`` is known
(concrete arrays, or Explicit-typed values under jit) and their leading axes are split
differently, a ValueError says so instead of silently moving data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Axes = tuple[str, ...]


def check_axes(name: str, axes: Any) -> Axes | None:
  """``axes`` (a str, a tuple of str, or None) as a tuple of names, or None when empty."""
  if axes is None:
    return None
  if isinstance(axes, str):
    return (axes,)
  if isinstance(axes, (tuple, list)) and all(isinstance(a, str) for a in axes):
    return tuple(axes) or None
  raise TypeError(
    f"`{name}` must be a mesh axis name, a tuple of names, or None, got "
    f"{type(axes).__name__} ({axes!r})."
  )


def axes_size(mesh: jax.sharding.Mesh | None, axes: Axes) -> int:
  """Number of devices along ``axes``: from ``mesh``, or the enclosing ``shard_map``'s."""
  if mesh is not None:
    return math.prod(mesh.shape[a] for a in axes)
  return math.prod(lax.axis_size(a) for a in axes)


def check_bound_axes(token_axes: Axes | None, vocab_axes: Axes | None) -> None:
  """Without ``mesh``, the named axes must be bound by an enclosing ``jax.shard_map``."""
  for name, axes in (("token_axes", token_axes), ("vocab_axis", vocab_axes)):
    for axis in axes or ():
      try:
        lax.axis_size(axis)
      except NameError as err:
        raise ValueError(
          f"`{name}`={axis!r} is not a mesh axis of an enclosing jax.shard_map. Call "
          "linear_cross_entropy inside shard_map over a mesh with that axis, or pass "
          "`mesh=` to let it shard the computation itself."
        ) from err
  _check_disjoint(token_axes, vocab_axes)


def _check_disjoint(token_axes: Axes | None, vocab_axes: Axes | None) -> None:
  shared = set(token_axes or ()) & set(vocab_axes or ())
  if shared:
    raise ValueError(
      f"`token_axes` and `vocab_axis` must not share a mesh axis, both name {sorted(shared)}."
    )


def check_mesh_layout(
  mesh: Any,
  e: jax.Array,
  c: jax.Array,
  labels: jax.Array,
  classifier_layout: str,
  token_axes: Axes | None,
  vocab_axes: Axes | None,
  shift: Any,
) -> None:
  """Checks ``mesh=`` against the axes and the arrays' shapes (and known placements).

  Raises:
    TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
    ValueError: an axis the mesh lacks, an axis in both roles, sizes that the axes do not
      divide, a shift across token shards, or ``labels`` split unlike ``e``.
  """
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  for name, axes in (("token_axes", token_axes), ("vocab_axis", vocab_axes)):
    missing = [a for a in axes or () if a not in mesh.axis_names]
    if missing:
      raise ValueError(
        f"`{name}` names {missing}, which `mesh` does not have (its axes: {mesh.axis_names})."
      )
  _check_disjoint(token_axes, vocab_axes)
  if not hasattr(e, "shape") or not hasattr(c, "shape") or not hasattr(labels, "shape"):
    return  # check_arrays reports it
  if token_axes:
    size = axes_size(mesh, token_axes)
    if e.ndim < 1 or e.shape[0] % size:
      raise ValueError(
        f"`e`'s leading axis ({e.shape[0] if e.ndim else None}) must be divisible by the "
        f"{size} devices of `token_axes`={token_axes}."
      )
    if e.ndim == 2 and shift not in (0, False):
      raise ValueError(
        "`shift` with a 2-D `e` (N, D) split over `token_axes` would shift across shards: "
        "give `e` a batch axis, shape (B, T, D), so that the tokens are split by sequence."
      )
  if vocab_axes:
    size = axes_size(mesh, vocab_axes)
    num_classes = c.shape[0 if classifier_layout == "vd" else 1] if c.ndim == 2 else None
    if num_classes is not None and num_classes % size:
      raise ValueError(
        f"V={num_classes} (the vocabulary size of `c`) must be divisible by the {size} "
        f"devices of `vocab_axis`={vocab_axes}; pad the classifier to a multiple of {size} "
        "(with bias -inf or labels that never name the padding)."
      )
  e_split, labels_split = _leading_split(e), _leading_split(labels)
  if e_split is not _UNKNOWN and labels_split is not _UNKNOWN and e_split != labels_split:
    raise ValueError(
      f"`labels` must be sharded like the tokens of `e` along their leading axis: e is "
      f"split over {e_split}, labels over {labels_split}."
    )


_UNKNOWN = object()


def _leading_split(x: jax.Array) -> Any:
  """The mesh axes splitting ``x``'s leading axis, when its placement is known."""
  sharding = getattr(x, "sharding", None) if not isinstance(x, jax.core.Tracer) else None
  if sharding is None:
    try:
      sharding = jax.typeof(x).sharding
    except (TypeError, AttributeError):
      return _UNKNOWN
    explicit = jax.sharding.AxisType.Explicit
    if not isinstance(sharding, NamedSharding) or explicit not in sharding.mesh.axis_types:
      return _UNKNOWN  # Auto axes: under jit the placement is XLA's to choose
  if not isinstance(sharding, NamedSharding) or x.ndim == 0:
    return _UNKNOWN
  first = sharding.spec[0] if len(sharding.spec) else None
  if first is None:
    return ()
  return (first,) if isinstance(first, str) else tuple(first)


def run_sharded(
  per_device: Callable[..., Any],
  mesh: jax.sharding.Mesh,
  e: jax.Array,  # (B, ..., D), leading axis split over token_axes
  c: jax.Array,  # (V, D) or (D, V), vocabulary split over vocab_axes
  labels: jax.Array,  # (B, ...)
  bias: jax.Array | None,  # (V,)
  weights: jax.Array | None = None,  # (B, ...), split like labels
  *,
  token_axes: Axes | None,
  vocab_axes: Axes | None,
  vocab_dim: int,
  per_token: bool,
  return_lse: bool,
  check_vma: bool = True,
):
  """``per_device(e, c, labels, bias, weights)`` on every device of ``mesh`` through
  ``shard_map``; per-token ``weights`` are split like ``labels``.

  ``check_vma`` is passed to ``shard_map``; the gradients are right either way (see
  ``cce_jax.differentiable``), and the Pallas implementations run with it off.
  """
  tokens = token_axes if token_axes else None
  vocab = vocab_axes if vocab_axes else None
  e_spec = P(tokens, *[None] * (e.ndim - 1))
  labels_spec = P(tokens, *[None] * (labels.ndim - 1))
  c_spec = P(vocab, None) if vocab_dim == 0 else P(None, vocab)
  loss_spec = labels_spec if per_token else P()
  out_specs = (loss_spec, labels_spec) if return_lse else loss_spec
  args, specs = [e, c, labels], [e_spec, c_spec, labels_spec]
  if bias is not None:
    args.append(bias)
    specs.append(P(vocab))
  if weights is not None:
    args.append(weights)
    specs.append(labels_spec)
  if jax.sharding.AxisType.Explicit in mesh.axis_types:
    args = [
      jax.sharding.reshard(x, NamedSharding(mesh, spec))
      for x, spec in zip(args, specs, strict=True)
    ]

  def body(e, c, labels, *optional):
    it = iter(optional)
    return per_device(
      e,
      c,
      labels,
      next(it) if bias is not None else None,
      next(it) if weights is not None else None,
    )

  sharded = jax.shard_map(
    body, mesh=mesh, in_specs=tuple(specs), out_specs=out_specs, check_vma=check_vma
  )
  return sharded(*args)
