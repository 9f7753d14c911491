"""The contract between the differentiable loss and an implementation ("xla", "reference",
Pallas), as typed ``Protocol``s over one bundle of inputs (:class:`TiledInputs`).

An implementation computes per-token statistics over *its* classes, the classes of ``c``
it was given, and the gradients of one backward pass; it never sees the loss formula, the
reductions or the mesh. :mod:`cce_jax.differentiable` owns those: it combines the statistics
over a vocabulary-sharded mesh axis, forms the loss (``loss_math``) and the per-token
coefficients of the softmax gradient, and calls the implementation's backward. So every
implementation gets every option and both sharded modes from one place.

Conventions shared by ``forward`` and ``backward`` (:class:`ForwardFn`, :class:`BackwardFn`):

* the arrays come as :class:`TiledInputs`; ``local_labels`` is -1 for ignored tokens, targets
  held by another shard, and out-of-range labels (which the caller has already turned into
  NaN loss and gradients);
* each implementation resolves and validates its own ``block_sizes``
  (:class:`ResolveBlockSizesFn`) and its tiling (``cce_jax.filtering``);
* Logits: ``z_nv = capped(e_n . c_v + b_v)`` in f32 (``loss_math.capped_logits``).
* Sizes need not be multiples of any block: ragged blocks are masked, ``c`` is never padded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap, sequential_vmap

from cce_jax.loss_math import TokenCoefficients
from cce_jax.options import LossOptions


class LocalForward(NamedTuple):
  """Per-token statistics over the local classes, each (N,) f32.

  Attributes:
    lse: ``log sum_v exp(z_nv)`` over the local classes.
    target: ``z_{n, local_labels[n]}`` (the soft-capped target logit, by an indexed dot), 0.0
      where ``local_labels[n] == -1``.
    logit_sum: ``sum_v z_nv`` over the local classes; None unless
      ``opts.label_smoothing > 0``.
    residuals: any pytree of arrays the implementation's backward needs (e.g. the class
      order of the vocabulary sort, per-block logit maxima); None unless ``for_backward``.
  """

  lse: jax.Array
  target: jax.Array
  logit_sum: jax.Array | None
  residuals: Any = None


class LocalGrads(NamedTuple):
  """Gradients of one backward pass over the local classes.

  Attributes:
    d_e: (N, D) float32: the contribution of the local classes to dE (summed over a
      vocabulary-sharded axis by the caller, in f32).
    d_c: shape and layout of ``c``, dtype of ``c``.
    d_bias: (V,) float32, or None without bias.
  """

  d_e: jax.Array
  d_c: jax.Array
  d_bias: jax.Array | None


class Residuals(NamedTuple):
  """The residuals every tiled implementation keeps today (any pytree is allowed).

  Attributes:
    order: (V,) int32 class order of the backward's tiles (the vocabulary sort); None for the
      identity.
    block_max: per token and vocabulary block, the largest logit, f32, laid out (blocks, N)
      or (N, blocks) as the implementation chooses; None for an exact backward.
  """

  order: jax.Array | None
  block_max: jax.Array | None


class TiledInputs(NamedTuple):
  """The arrays every implementation's functions take, as one bundle (a pytree).

  Attributes:
    e: (N, D) hidden states.
    c: (V, D) (``opts.classifier_layout == "vd"``) or (D, V) (``"dv"``), the dtype of ``e``;
      V is the local vocabulary.
    local_labels: (N,) int32: the token's target class in ``[0, V)`` where this classifier
      holds it, else -1.
    bias: (V,) any float dtype, or None.
  """

  e: jax.Array
  c: jax.Array
  local_labels: jax.Array
  bias: jax.Array | None


class ForwardFn(Protocol):
  """Per-token statistics over the local classes (:class:`LocalForward`); with
  ``for_backward`` also the residuals the backward needs (any pytree, e.g. :class:`Residuals`).

  Raises:
    TypeError, ValueError: inputs or options the implementation does not take.
  """

  def __call__(
    self, inputs: TiledInputs, opts: LossOptions, for_backward: bool
  ) -> LocalForward: ...


class BackwardFn(Protocol):
  """The gradients of one backward pass over the local classes (:class:`LocalGrads`).

  Args:
    inputs: as given to the forward.
    residuals: ``LocalForward.residuals`` of ``forward(inputs, opts, for_backward=True)``.
    lse: (N,) f32, the forward's local lse; ``p_nv = exp(z_nv - lse_n)`` over the local
      classes.
    coeffs: per-token factors (``loss_math.TokenCoefficients``, each (N,) f32; ``g`` is
      informative only) of the gradient w.r.t. the soft-capped logits
      ``dz_nv = alpha_n p_nv - beta_n [v == local_labels[n]] - gamma_n``, then
      ``dx_nv = dz_nv * loss_math.softcap_derivative(z_nv)``; ``dE_n = sum_v dx_nv c_v``,
      ``dC_v = sum_n dx_nv e_n``, ``db_v = sum_n dx_nv``. The uniform term ``-gamma_n`` goes
      inside the tiles only with softcap (``filtering.uniform_in_tile``); without softcap it
      is added exactly outside them (``filtering.uniform_terms``), so that filtering can never
      drop it. ``alpha_n`` is NaN for a token with a bad label: the NaN must reach dE and dC.
    filter_scale: (N,) f32, or None for exact (skip nothing). Otherwise a tile may skip the
      products whose flag is on (``opts.filter_e_grad``: dE, ``opts.filter_c_grad``: dC)
      where ``filtering.skip_table`` says so (``filter_scale_n = |alpha_n| / |g_n|``: 0 for
      rows whose gradient is zero, inf for rows with only an lse cotangent, NaN for a bad
      label; NaN and inf never let a tile go). A skipped tile's bias-gradient entries may be
      dropped with it. Skipping is allowed, never required.
    opts: the loss options.
  """

  def __call__(
    self,
    inputs: TiledInputs,
    residuals: Any,
    lse: jax.Array,
    coeffs: TokenCoefficients,
    filter_scale: jax.Array | None,
    opts: LossOptions,
  ) -> LocalGrads: ...


class SkipTableFn(Protocol):
  """(token blocks, vocab blocks) bool: the tiles a backward of ``inputs`` skips (it runs the
  forward); ``filter_scale`` maps the forward's (N,) lse to the (N,) filter scale. All False
  when nothing filters."""

  def __call__(
    self,
    inputs: TiledInputs,
    filter_scale: Callable[[jax.Array], jax.Array],
    opts: LossOptions,
  ) -> jax.Array: ...


class ResolveBlockSizesFn(Protocol):
  """The implementation's tile sizes for inputs of ``dtype``: ``block_sizes`` itself when it
  is of the implementation's type, its default when None.

  Raises:
    TypeError: ``block_sizes`` of another type (the message names ``block_sizes``).
    ValueError: sizes the implementation cannot run with inputs of ``dtype``.
  """

  def __call__(self, block_sizes: Any, dtype: Any) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One implementation, as registered in :mod:`cce_jax.dispatch` (each module exposes one as
  ``IMPLEMENTATION``).

  Attributes:
    name: the ``impl`` string.
    forward: see :class:`ForwardFn`.
    backward: see :class:`BackwardFn`.
    skip_table: see :class:`SkipTableFn`.
    resolve_block_sizes: see :class:`ResolveBlockSizesFn`.
    is_pallas: runs Pallas kernels: ``interpret`` means something to it, and inside
      ``shard_map`` its interpret mode needs ``check_vma=False``.
    backends: the JAX backends (``jax.default_backend()``) its compiled kernels run on;
      None: every backend. Elsewhere a Pallas implementation needs ``interpret=True``.
    unsupported_kinds: regular expressions over the lower-case ``jax.Device.device_kind`` of
      devices of those backends that its compiled kernels cannot support (e.g. older TPU
      generations), refused up front like another backend.
  """

  name: str
  forward: ForwardFn
  backward: BackwardFn
  skip_table: SkipTableFn
  resolve_block_sizes: ResolveBlockSizesFn
  is_pallas: bool = False
  backends: tuple[str, ...] | None = None
  unsupported_kinds: tuple[str, ...] = ()


def resolve_block_sizes_of(
  block_sizes_type: type, default: Callable[[Any], Any]
) -> ResolveBlockSizesFn:
  """A :class:`ResolveBlockSizesFn` that takes instances of ``block_sizes_type`` and gives
  ``default(dtype)`` for None."""

  def resolve(block_sizes: Any, dtype: Any) -> Any:
    if block_sizes is None:
      return default(dtype)
    if not isinstance(block_sizes, block_sizes_type):
      name = block_sizes_type.__qualname__
      module = block_sizes_type.__module__
      expected = f"cce_jax.{name}" if module.startswith("cce_jax") else f"{module}.{name}"
      raise TypeError(
        f"`block_sizes` must be a {expected} for this `impl`, got {type(block_sizes).__name__}."
      )
    return block_sizes

  return resolve


def fold_or_sequence(
  call: Callable[..., Any],
  one_call: Callable[[TiledInputs], Any],
  axis_size: int,
  in_batched: tuple[bool, ...],
  inputs: TiledInputs,
) -> tuple[Any, int | None]:
  """The shared part of a ``custom_vmap`` rule that folds examples into the token axis.

  With ``c`` or ``bias`` mapped per example, ``one_call`` runs on the examples one after
  another and its per-example outputs come back with ``None`` tokens. Otherwise ``e`` (B, N,
  D) and the labels (B, N) are broadcast over the batch where unmapped and ``call`` runs once
  on the (B N, D) tokens: its outputs are per folded token, returned with N.
  """
  e, c, local_labels, bias = inputs
  e_batched, c_batched, labels_batched, bias_batched = in_batched
  if c_batched or bias_batched:
    in_axes = tuple(0 if b else None for b in in_batched)
    one_example = lambda *arrays: one_call(TiledInputs(*arrays))
    return jax.vmap(sequential_vmap(one_example), in_axes=in_axes)(*inputs), None
  if not e_batched:
    e = jnp.broadcast_to(e, (axis_size, *e.shape))
  if not labels_batched:
    local_labels = jnp.broadcast_to(local_labels, (axis_size, *local_labels.shape))
  num_tokens, hidden = e.shape[1:]
  return call(e.reshape(-1, hidden), c, local_labels.reshape(-1), bias), num_tokens


def fold_examples(forward: ForwardFn, block_max_token_axis: int) -> ForwardFn:
  """``forward`` that, under ``jax.vmap``, folds the mapped axis into the token axis: one call
  over every example's tokens, as if the batch were given as leading dimensions.

  ``forward`` must return :class:`Residuals` (or None) whose ``block_max`` has its token axis
  at ``block_max_token_axis``. A classifier mapped per example cannot be folded: the examples
  then run one after another.
  """

  @functools.cache
  def folded(opts: LossOptions, for_backward: bool):
    one_call = functools.partial(forward, opts=opts, for_backward=for_backward)

    @custom_vmap
    def call(e, c, local_labels, bias):
      return one_call(TiledInputs(e, c, local_labels, bias))

    @call.def_vmap
    def rule(axis_size, in_batched, e, c, local_labels, bias):
      inputs = TiledInputs(e, c, local_labels, bias)
      out, num_tokens = fold_or_sequence(call, one_call, axis_size, in_batched, inputs)
      if num_tokens is None:
        return out, jax.tree.map(lambda _: True, out)
      per_example = lambda x: None if x is None else x.reshape(axis_size, num_tokens)
      residuals = out.residuals
      if residuals is not None and residuals.block_max is not None:
        # Split the token axis into (examples, tokens) and move the examples first; one class
        # order serves every example.
        block_max = jnp.moveaxis(residuals.block_max, block_max_token_axis, 0)
        block_max = block_max.reshape(axis_size, num_tokens, *block_max.shape[1:])
        block_max = jnp.moveaxis(block_max, 1, 1 + block_max_token_axis)
        residuals = residuals._replace(block_max=block_max)
      out = LocalForward(
        per_example(out.lse), per_example(out.target), per_example(out.logit_sum), residuals
      )
      batched = LocalForward(True, True, None if out.logit_sum is None else True, None)
      if residuals is not None:
        batched = batched._replace(
          residuals=Residuals(
            None if residuals.order is None else False,
            None if residuals.block_max is None else True,
          )
        )
      return out, batched

    return call

  def folded_forward(inputs: TiledInputs, opts: LossOptions, for_backward: bool):
    return folded(opts, for_backward)(*inputs)

  return folded_forward


def examples_in_sequence(backward: BackwardFn) -> BackwardFn:
  """``backward`` that, under ``jax.vmap``, runs the examples one after another, so that
  per-tile branches stay real branches (a vmapped ``cond`` computes both sides) and kernels
  that cannot be batched still run."""

  def sequential_backward(
    inputs: TiledInputs, residuals, lse, coeffs, filter_scale, opts: LossOptions
  ):
    one_call = functools.partial(backward, opts=opts)
    return sequential_vmap(one_call)(inputs, residuals, lse, coeffs, filter_scale)

  return sequential_backward


__all__ = [
  "BackwardFn",
  "ForwardFn",
  "Implementation",
  "LocalForward",
  "LocalGrads",
  "LossOptions",
  "Residuals",
  "ResolveBlockSizesFn",
  "SkipTableFn",
  "TiledInputs",
  "TokenCoefficients",
  "examples_in_sequence",
  "fold_examples",
  "resolve_block_sizes_of",
]
