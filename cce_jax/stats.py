r"""``cce_jax.token_stats``: per-token softmax statistics of ``e @ c.T`` without the logits.

What RL and evaluation code computes from full logits (the log-sum-exp, the entropy of the
softmax, the argmax, the log-probability of a label and whether the argmax hits it) in one
streamed pass over the vocabulary, with the loss's memory bound. :mod:`cce_jax.local_stats`
computes the statistics over the classes a device holds; here they are made differentiable
(one ``jax.custom_vjp`` whose backward is the tiled one of ``local_stats``), combined over a
vocabulary-sharded mesh axis, and turned into the public fields. Over shards ``k`` with local
log-sum-exp ``L_k``, local entropy ``H_k`` and ``w_k = exp(L_k - L)``:

.. math::
  L = \log \sum_k e^{L_k}, \qquad H = \sum_k w_k (H_k - \log w_k),

and the argmax is the lowest global class id among the shards holding the global maximum.

Implementations (:func:`stats_implementation`): ``"xla"`` and ``"reference"`` of
:mod:`cce_jax.local_stats`, and the Pallas forwards of ``pallas_kernels.gpu.token_stats`` and
``pallas_kernels.tpu.token_stats`` (imported on first use). The Pallas backward kernels take the
softmax gradient in the per-token factor form ``alpha p - beta [v = t]`` (``cce_jax.tiled``),
which the entropy term ``-b p (log p + H)`` does not fit; so a Pallas ``impl`` differentiates
with the ``"xla"`` tiled backward (:func:`cce_jax.local_stats.xla_backward`, on the ``"xla"``
default tiles): forward in the kernel, backward by XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax import (
  checks,
  differentiable,
  dispatch,
  filtering,
  local_stats,
  loss_math,
  sharding,
  stats_folding,
  target,
  vma,
)
from cce_jax.block_sizes import BlockSizes
from cce_jax.local_stats import (
  IMPLEMENTATIONS,
  LocalStats,
  StatsCotangents,
  StatsImplementation,
  xla_backward,
)
from cce_jax.options import LossOptions
from cce_jax.tiled import LocalGrads, TiledInputs

# The implementations of token_stats; impl="auto" means "xla".
STATS_IMPLS = ("auto", "xla", "reference", "pallas_gpu", "pallas_tpu")
# impl -> module whose ``forward(inputs, opts) -> LocalStats`` is the Pallas forward.
_PALLAS_FORWARDS = {
  "pallas_gpu": "pallas_kernels.gpu.token_stats",
  "pallas_tpu": "pallas_kernels.tpu.token_stats",
}

FIRST_ORDER_ONLY = (
  "cce_jax.token_stats supports first-order reverse-mode differentiation only (jax.grad, "
  "jax.value_and_grad, jax.vjp); it was asked for a derivative of its gradient (jax.hessian, "
  "jax.grad of jax.grad, jax.jacfwd, or a forward-mode derivative). Its gradient comes from "
  "a tiled backward that is not differentiable itself."
)


class TokenStats(NamedTuple):
  """Per-token statistics, each of shape ``labels.shape[:-1] + (T - shift,)``.

  Attributes:
    lse: f32 log-sum-exp of the (soft-capped) logits; differentiable.
    entropy: f32 entropy of the softmax, ``-sum_v p log p`` (masked classes add 0), in
      ``[0, log V]``; differentiable.
    argmax: int32 class id of the largest logit, the lowest id on ties (``jnp.argmax``).
    logprob: f32 ``log p`` of the label, 0.0 at ignored tokens, NaN at a label outside
      ``[0, V)``; differentiable. None without ``labels``.
    correct: bool, ``argmax == label`` at counted tokens, False at ignored ones. None without
      ``labels``.

  Example:
    >>> import jax, jax.numpy as jnp, cce_jax
    >>> e, c = jnp.eye(3, 4)[None], 5.0 * jnp.eye(6, 4)  # (1, 3, 4) tokens, (6, 4) classes
    >>> stats = cce_jax.token_stats(e, c, jnp.array([[0, 2, -100]]))
    >>> stats.argmax.tolist(), stats.correct.tolist(), stats.logprob[0, 2].item()
    ([[0, 1, 2]], [[True, False, False]], 0.0)
  """

  lse: jax.Array
  entropy: jax.Array
  argmax: jax.Array
  logprob: jax.Array | None = None
  correct: jax.Array | None = None


@jax.custom_jvp
def _first_order_only(tree):
  """``tree`` unchanged; differentiating it raises NotImplementedError (FIRST_ORDER_ONLY)."""
  return tree


@_first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
  del primals, tangents
  raise NotImplementedError(FIRST_ORDER_ONLY)


def _xla_tiles_backward(
  inputs: TiledInputs, lse: jax.Array, entropy: jax.Array, cot: StatsCotangents, opts: LossOptions
) -> LocalGrads:
  """The backward of the Pallas implementations: :func:`cce_jax.local_stats.xla_backward`
  on the ``"xla"`` implementation's default tiles for ``inputs.e.dtype``."""
  xla_opts = dataclasses.replace(
    opts, block_sizes=BlockSizes.get_default(inputs.e.dtype), interpret=False
  )
  return xla_backward(inputs, lse, entropy, cot, xla_opts)


@functools.cache
def stats_implementation(impl: str) -> StatsImplementation:
  """The forward and backward of ``impl`` (resolved: not "auto"): ``"xla"`` and
  ``"reference"`` from :data:`cce_jax.local_stats.IMPLEMENTATIONS`; a Pallas ``impl``'s forward
  kernel (one call over every example's tokens under ``jax.vmap``,
  :func:`cce_jax.stats_folding.fold_examples`) with the ``"xla"`` tiled backward (see the
  module docstring)."""
  if impl in IMPLEMENTATIONS:
    return IMPLEMENTATIONS[impl]
  module = importlib.import_module(_PALLAS_FORWARDS[impl])
  return StatsImplementation(stats_folding.fold_examples(module.forward), _xla_tiles_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _local_stats(
  e, c, held, bias, opts: LossOptions, forward_opts: LossOptions, impl: str
) -> LocalStats:
  """:class:`LocalStats` by ``impl``'s forward in the tiles of ``forward_opts``; the backward
  uses those of ``opts`` (they differ only by their block sizes)."""
  return stats_implementation(impl).forward(TiledInputs(e, c, held, bias), forward_opts)


def _local_stats_fwd(e, c, held, bias, opts: LossOptions, forward_opts: LossOptions, impl: str):
  e, c, bias = _first_order_only((e, c, bias))
  stats = stats_implementation(impl).forward(TiledInputs(e, c, held, bias), forward_opts)
  return stats, (e, c, held, bias, stats.lse, stats.entropy)


def _local_stats_bwd(
  opts: LossOptions, forward_opts: LossOptions, impl: str, residuals, cotangents: LocalStats
):
  del forward_opts
  residuals, cotangents = _first_order_only((residuals, cotangents))
  e, c, held, bias, lse, entropy = residuals
  # peak and argmax are only compared (stop_gradient in _per_device): no cotangent to pass.
  cot = StatsCotangents(cotangents.lse, cotangents.entropy, cotangents.target)
  grads = stats_implementation(impl).backward(
    TiledInputs(e, c, held, bias), filtering.exp_shift(lse), entropy, cot, opts
  )
  d_bias = None if bias is None else grads.d_bias.astype(bias.dtype)
  return grads.d_e.astype(e.dtype), grads.d_c.astype(c.dtype), None, d_bias


_local_stats.defvjp(_local_stats_fwd, _local_stats_bwd)


def _combine(stats: LocalStats, offset, vocab_axis) -> LocalStats:
  """The statistics over every shard of ``vocab_axis`` (f32; differentiable); ``argmax`` as a
  global class id (``offset``: this shard's first class)."""
  argmax = stats.argmax + offset
  if vocab_axis is None:
    return stats._replace(argmax=argmax)
  peak_lse = filtering.exp_shift(lax.pmax(lax.stop_gradient(stats.lse), vocab_axis))
  lse = peak_lse + jnp.log(lax.psum(jnp.exp(stats.lse - peak_lse), vocab_axis))
  log_w = stats.lse - lse
  weight = jnp.exp(log_w)
  safe_log_w = jnp.where(weight > 0.0, log_w, 0.0)  # -inf on a shard without mass
  entropy = lax.psum(weight * (stats.entropy - safe_log_w), vocab_axis)
  peak = lax.pmax(stats.peak, vocab_axis)
  candidate = jnp.where(stats.peak == peak, argmax, jnp.iinfo(jnp.int32).max)
  argmax = lax.pmin(candidate, vocab_axis)
  return LocalStats(lse, entropy, lax.psum(stats.target, vocab_axis), peak, argmax)


@functools.partial(jax.jit, static_argnames=("opts", "forward_opts", "shift", "impl", "has_labels"))
def _per_device(
  e: jax.Array,  # (..., T, D)
  c: jax.Array,  # (V_local, D) or (D, V_local)
  labels: jax.Array,  # (..., T) int32, global class ids (ignore_index everywhere without labels)
  bias: jax.Array | None,  # (V_local,)
  *,
  opts: LossOptions,
  forward_opts: LossOptions,
  shift: int,
  impl: str,
  has_labels: bool,
) -> TokenStats:
  """The statistics of this device's tokens (over the classes of every vocabulary shard);
  the forward's tiles are ``forward_opts``'s, the backward's ``opts``'s."""
  batch_shape, seq_len = e.shape[:-2], e.shape[-2]
  out_shape = (*batch_shape, seq_len - shift)
  num_tokens = labels.size
  if num_tokens == 0:
    f32 = jnp.zeros(out_shape, jnp.float32)
    correct = jnp.zeros(out_shape, bool) if has_labels else None
    logprob = f32 if has_labels else None
    return TokenStats(f32, f32, jnp.zeros(out_shape, jnp.int32), logprob, correct)
  if shift:
    tail = jnp.full((*batch_shape, shift), opts.ignore_index, jnp.int32)
    labels = jnp.concatenate([labels[..., shift:].astype(jnp.int32), tail], axis=-1)
  labels = labels.reshape(-1).astype(jnp.int32)  # (N,)
  num_local = c.shape[opts.vocab_dim]
  offset, num_classes = differentiable.vocab_shard(num_local, opts.vocab_axis)
  held = differentiable.local_labels(labels, offset, num_local, num_classes, opts)
  flat_e = e.reshape(-1, e.shape[-1])  # (N, D)
  # Under shard_map the gradients of e and c differ per shard: cast them to vary along every
  # axis any input varies along, so that the transpose of the cast sums them (as the loss).
  flat_e, c, bias = vma.vary_like((flat_e, c, bias), flat_e, c, bias, held)
  local = _local_stats(flat_e, c, held, bias, opts, forward_opts, impl)
  local = local._replace(peak=lax.stop_gradient(local.peak))
  stats = _combine(local, offset, opts.vocab_axis)

  def per_token(x):  # (N,) -> out_shape
    return x.reshape(*batch_shape, seq_len)[..., : seq_len - shift]

  logprob = correct = None
  if has_labels:
    kinds = loss_math.label_kinds(labels, num_classes, opts.ignore_index)
    logprob = jnp.where(kinds.ignored, 0.0, stats.target - stats.lse)
    logprob = per_token(jnp.where(kinds.out_of_range, jnp.nan, logprob))
    counted = ~kinds.ignored & ~kinds.out_of_range
    correct = per_token(counted & (stats.argmax == labels))
  return TokenStats(
    per_token(stats.lse), per_token(stats.entropy), per_token(stats.argmax), logprob, correct
  )


def token_stats(
  e: jax.Array,
  c: jax.Array,
  labels: jax.Array | None = None,
  *,
  bias: jax.Array | None = None,
  ignore_index: int = -100,
  softcap: float | None = None,
  shift: int | bool = 0,
  impl: str = "auto",
  interpret: bool = False,
  classifier_layout: str = "vd",
  block_sizes: BlockSizes | None = None,
  check_labels: bool = False,
  vocab_axis: str | tuple[str, ...] | None = None,
  mesh: jax.sharding.Mesh | None = None,
  token_axes: str | tuple[str, ...] | None = None,
) -> TokenStats:
  r"""Per-token log-sum-exp, entropy, argmax and (with labels) label log-probability and
  accuracy of the logits ``e @ c.T``, in one pass over the vocabulary, without the logits.

  For token ``n`` with soft-capped logits ``z_nv`` (as in :func:`linear_cross_entropy`) and
  ``p_nv = exp(z_nv - L_n)``:

  .. math::
    L_n = \log \sum_v e^{z_{nv}}, \quad H_n = -\sum_{v: p_{nv} > 0} p_{nv} \log p_{nv},
    \quad \hat v_n = \min \arg\max_v z_{nv}, \quad \log p_{n t_n} = z_{n t_n} - L_n.

  The memory bound is the loss forward's: a few f32 tiles of ``token_block x vocab_block``
  and per-token vectors. ``lse``, ``entropy`` and ``logprob`` are differentiable (first order,
  reverse mode) w.r.t. ``e``, ``c`` and ``bias``: the backward recomputes the logits tile by
  tile with ``dz_nv = p_nv (a_n - b_n (log p_nv + H_n)) + c_n [v = t_n]`` from the cotangents
  ``a, b, c`` of the lse, the entropy and the label logit (``dH/dz = -p (z - E_p[z])``, e.g.
  for an entropy bonus), never filtered. The gradient of ``logprob`` is the cross-entropy
  gradient negated.

  Args:
    e: hidden states, shape (..., T, D), float32, bfloat16, float16 or float64.
    c: classifier, (V, D), or (D, V) with ``classifier_layout="dv"``; the dtype of ``e``.
    labels: optional integer labels, shape (..., T); without them ``logprob`` and
      ``correct`` are None.
    bias: optional (V,) float bias; ``-inf`` masks a class (probability 0, adds 0 to the
      entropy, never the argmax unless every class is masked).
    ignore_index: label of tokens whose ``logprob`` is 0.0 and ``correct`` False (``lse``,
      ``entropy`` and ``argmax`` are computed there too).
    softcap: logit soft-capping value, or None.
    shift: position ``i`` is scored against ``labels[..., i + shift]``; outputs have
      ``T - shift`` positions (also without labels).
    impl: ``"auto"`` (= ``"xla"``), ``"xla"`` (streamed tiles, every backend),
      ``"reference"`` (materialized f32 logits), ``"pallas_gpu"`` or ``"pallas_tpu"`` (the
      loss's forward kernel with an online entropy and argmax; float32 or bfloat16 inputs
      (``"pallas_gpu"`` also float16), ``block_sizes`` of that kernel's type). A Pallas
      ``impl`` differentiates with the ``"xla"`` tiled backward on the ``"xla"`` default
      tiles: its backward kernels take the gradient in a per-token factor form that the
      entropy term does not fit. ``"pallas_mosaic_gpu"`` raises NotImplementedError.
    interpret: run a Pallas ``impl``'s kernel in interpret mode (on any backend; slow, for
      tests); ignored by the others.
    classifier_layout: ``"vd"`` or ``"dv"``.
    block_sizes: the tiles, forward and backward (default: the implementation's):
      :class:`BlockSizes` for ``"xla"``, ``GPUBlockSizes`` / ``TPUBlockSizes`` for the Pallas
      forwards. The ``"xla"`` default is the loss's (``BlockSizes.get_default``), except for
      the forward on CPU, whose one streamed pass is fastest in tiles of 1-2 MB
      (``local_stats.CPU_FORWARD_TILES``: 2048 x 512 for f32, 1024 x 512 for 16-bit inputs).
    check_labels: raise ValueError for a label outside [0, V) that is not ``ignore_index``
      (as :func:`linear_cross_entropy`).
    vocab_axis, mesh, token_axes: as :func:`linear_cross_entropy`: inside ``jax.shard_map``
      ``c`` is this device's vocabulary slice and the statistics are combined across
      ``vocab_axis`` (the argmax as the lowest global id holding the global maximum); with
      ``mesh=`` the function shards itself. The outputs are per token, split like ``labels``.

  Returns:
    :class:`TokenStats` ``(lse, entropy, argmax, logprob, correct)``, each of shape
    ``(..., T - shift)``.

  Raises:
    TypeError, ValueError: as :func:`linear_cross_entropy` (the message names the argument).
    NotImplementedError: ``impl="pallas_mosaic_gpu"``; a derivative of the gradient (second
      order) or a forward-mode derivative.

  Example:
    >>> import jax, jax.numpy as jnp, cce_jax
    >>> e = jax.random.normal(jax.random.key(0), (2, 5, 16))   # (B, T, D)
    >>> c = jax.random.normal(jax.random.key(1), (100, 16))    # (V, D)
    >>> labels = jax.random.randint(jax.random.key(2), (2, 5), 0, 100)
    >>> stats = cce_jax.token_stats(e, c, labels, shift=1)
    >>> stats.entropy.shape, stats.argmax.dtype
    ((2, 4), dtype('int32'))
    >>> p = jax.nn.softmax(jnp.einsum("btd,vd->btv", e[:, :-1], c))
    >>> bool(jnp.allclose(stats.entropy, -jnp.sum(p * jnp.log(p), -1), atol=1e-4))
    True
  """
  impl = checks.check_choice("impl", impl, checks.IMPLS)
  if impl not in STATS_IMPLS:
    raise NotImplementedError(
      f"`impl`={impl!r}: cce_jax.token_stats has no kernel for it; use one of {STATS_IMPLS} "
      "(impl='xla' streams the vocabulary on every backend)."
    )
  impl = "xla" if impl == "auto" else impl
  layout = checks.check_choice("classifier_layout", classifier_layout, checks.CLASSIFIER_LAYOUTS)
  has_labels = labels is not None
  if not has_labels:
    if not hasattr(e, "shape"):
      raise TypeError(f"`e` must be an array, got {type(e).__name__}.")
    labels = jax.ShapeDtypeStruct(e.shape[:-1], jnp.int32)  # for the shape checks
  checks.check_arrays(e, c, labels, bias, layout)
  shift = checks.check_shift(shift, labels.shape[-1])
  token_axes = sharding.check_axes("token_axes", token_axes)
  vocab_axes = sharding.check_axes("vocab_axis", vocab_axis)
  opts = checks.build_options(
    dtype=e.dtype,
    ignore_index=ignore_index,
    softcap=softcap,
    z_loss=0.0,
    label_smoothing=0.0,
    filter_eps=None,
    filter_e_grad=False,
    filter_c_grad=False,
    sort_vocab=False,
    classifier_layout=layout,
    block_sizes=block_sizes,
    implementation=dispatch.implementation(impl),
    interpret=interpret,
    vocab_axis=vocab_axes,
    platform=checks.compile_platform(e, c),
  )
  if not has_labels:
    labels = jnp.full(e.shape[:-1], opts.ignore_index, jnp.int32)
  if mesh is not None:
    sharding.check_mesh_layout(mesh, e, c, labels, layout, token_axes, vocab_axes, shift)
  elif vocab_axes or token_axes:
    sharding.check_bound_axes(token_axes, vocab_axes)
  num_classes = c.shape[opts.vocab_dim]
  if vocab_axes and mesh is None:
    num_classes *= sharding.axes_size(None, vocab_axes)
  if has_labels:
    if checks.check_bool("check_labels", check_labels):
      checks.check_label_values(labels, num_classes, opts.ignore_index, shift)
    labels = checks.labels_as_int32(labels, num_classes)
  forward_opts = opts
  if block_sizes is None and impl == "xla":
    forward_sizes = local_stats.forward_block_sizes(e.dtype, target.platform(mesh))
    if forward_sizes is not None:
      forward_opts = dataclasses.replace(opts, block_sizes=forward_sizes)
  per_device = functools.partial(
    _per_device,
    opts=opts,
    forward_opts=forward_opts,
    shift=shift,
    impl=impl,
    has_labels=has_labels,
  )
  if mesh is None:
    return per_device(e, c, labels, bias)
  return sharding.run_sharded(
    lambda e, c, labels, bias, weights: per_device(e, c, labels, bias),
    mesh,
    e,
    c,
    labels,
    bias,
    token_axes=token_axes,
    vocab_axes=vocab_axes,
    vocab_dim=opts.vocab_dim,
    per_token=True,
    return_lse=False,
    # Pallas implementations run with check_vma off (their interpret mode cannot track
    # varying axes), as in linear_cross_entropy.
    check_vma=not dispatch.implementation(impl).is_pallas,
  )
