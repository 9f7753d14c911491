"""The public functional API: ``linear_cross_entropy`` and ``filter_stats``."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from cce_jax import checks, differentiable, dispatch, loss_math, sharding
from cce_jax import grad_in_forward as fused_grad
from cce_jax.block_sizes import BlockSizes
from cce_jax.dispatch import resolve_impl
from cce_jax.options import LossOptions
from cce_jax.tiled import TiledInputs


def _target_labels(labels: jax.Array, shift: int, ignore_index: int) -> jax.Array:
  """int32 labels where position i holds labels[..., i + shift] (the last ``shift`` ignored).

  ``labels`` went through ``checks.labels_as_int32`` (values beyond int32 of wider dtypes are
  already out of range, not wrapped).
  """
  labels = labels.astype(jnp.int32)
  if shift == 0:
    return labels
  tail = jnp.full((*labels.shape[:-1], shift), ignore_index, jnp.int32)
  return jnp.concatenate([labels[..., shift:], tail], axis=-1)


def _target_weights(weights: jax.Array, counted: jax.Array, shift: int) -> jax.Array:
  """f32 weights where position i holds weights[..., i + shift], 0 where the token is not
  ``counted`` (ignored, or among the last ``shift``), so that a weight there never reaches
  the loss (not even an inf or NaN one). ``counted`` has the shape of ``weights``."""
  weights = weights.astype(jnp.float32)
  if shift:
    tail = jnp.zeros((*weights.shape[:-1], shift), jnp.float32)
    weights = jnp.concatenate([weights[..., shift:], tail], axis=-1)
  return jnp.where(counted, weights, 0.0)


def _weighted_mean(total: jax.Array, weight_sum: jax.Array) -> jax.Array:
  """``total / weight_sum``, 0 (with zero gradients, never NaN) where ``weight_sum`` is 0."""
  empty = weight_sum == 0.0
  return jnp.where(empty, 0.0, total / jnp.where(empty, 1.0, weight_sum))


@functools.partial(
  jax.jit,
  static_argnames=("opts", "reduction", "shift", "return_lse", "impl", "token_axes", "fused"),
)
def _linear_cross_entropy(
  e: jax.Array,
  c: jax.Array,
  labels: jax.Array,
  bias: jax.Array | None,
  weights: jax.Array | None = None,
  *,
  opts: LossOptions,
  reduction: str,
  shift: int,
  return_lse: bool,
  impl: str,
  token_axes: tuple[str, ...] | None = None,
  fused: bool = False,
):
  """The loss on this device's arrays; sums and counts are psum-ed over ``token_axes``.
  ``fused``: the gradient computed in the forward (``cce_jax.grad_in_forward``)."""
  batch_shape, seq_len = labels.shape[:-1], labels.shape[-1]
  out_shape = (*batch_shape, seq_len - shift)
  labels = _target_labels(labels, shift, opts.ignore_index)
  counted = labels[..., : seq_len - shift] != opts.ignore_index
  if weights is not None:
    weights = _target_weights(weights, labels != opts.ignore_index, shift)
  if 0 in out_shape:
    # No token: the loss is 0 (not 0/0) and every gradient is zero.
    loss = jnp.zeros(out_shape if reduction == "none" else (), jnp.float32)
    if reduction != "none" and token_axes:
      loss = lax.psum(loss, token_axes)
    return (loss, jnp.zeros(out_shape, jnp.float32)) if return_lse else loss

  flat_weights = None if weights is None else weights.reshape(-1)
  if fused:
    # Tokens past T - shift have ignore_index labels (and weight 0): they add nothing.
    total = fused_grad.summed_loss(
      e.reshape(-1, e.shape[-1]), c, labels.reshape(-1), bias, flat_weights, opts
    )
    return _reduce(total, counted, weights, reduction, shift, seq_len, token_axes)
  out = differentiable.token_loss(
    e.reshape(-1, e.shape[-1]),
    c,
    labels.reshape(-1),
    bias,
    opts,
    return_lse,
    impl,
    flat_weights,
  )
  token_loss, lse = out if return_lse else (out, None)
  token_loss = token_loss.reshape(*batch_shape, seq_len)[..., : seq_len - shift]
  if reduction == "none":
    loss = token_loss
  else:
    loss = _reduce(jnp.sum(token_loss), counted, weights, reduction, shift, seq_len, token_axes)
  if return_lse:
    return loss, lse.reshape(*batch_shape, seq_len)[..., : seq_len - shift]
  return loss


def _reduce(
  total: jax.Array,  # () f32: the (weighted) sum of this device's token losses
  counted: jax.Array,  # (..., T - shift) bool
  weights: jax.Array | None,  # (..., T) f32, target-shifted
  reduction: str,
  shift: int,
  seq_len: int,
  token_axes: tuple[str, ...] | None,
) -> jax.Array:
  """The "sum" or "mean" (over the counted tokens, or their weight sum) of the token losses,
  psum-ed over ``token_axes``."""
  if weights is None:
    count = jnp.sum(counted, dtype=jnp.int32)
  else:
    count = jnp.sum(weights[..., : seq_len - shift])  # the weight sum of the counted tokens
  if token_axes:
    total, count = lax.psum((total, count), token_axes)
  if reduction == "mean" and weights is None:
    return total / jnp.maximum(count, 1).astype(jnp.float32)
  if reduction == "mean":
    return _weighted_mean(total, count)
  return total


def _prepare(
  e, c, labels, bias, *, impl: str, shift: Any, classifier_layout: Any, **options: Any
) -> tuple[LossOptions, int]:
  """Checks the arrays and options shared by the public functions (at trace time); ``impl``
  is resolved (not "auto")."""
  layout = checks.check_choice("classifier_layout", classifier_layout, checks.CLASSIFIER_LAYOUTS)
  checks.check_arrays(e, c, labels, bias, layout)
  shift = checks.check_shift(shift, labels.shape[-1])
  opts = checks.build_options(
    dtype=e.dtype,
    classifier_layout=layout,
    implementation=dispatch.implementation(impl),
    platform=checks.compile_platform(e, c),
    **options,
  )
  return opts, shift


def linear_cross_entropy(
  e: jax.Array,
  c: jax.Array,
  labels: jax.Array,
  *,
  bias: jax.Array | None = None,
  weights: jax.Array | None = None,
  ignore_index: int = -100,
  softcap: float | None = None,
  reduction: str = "mean",
  shift: int | bool = 0,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
  filter_eps: float | str | None = "auto",
  filter_e_grad: bool = True,
  filter_c_grad: bool = True,
  return_lse: bool = False,
  impl: str = "auto",
  interpret: bool = False,
  classifier_layout: str = "vd",
  block_sizes: BlockSizes | None = None,
  sort_vocab: bool = True,
  check_labels: bool = False,
  vocab_axis: str | tuple[str, ...] | None = None,
  mesh: jax.sharding.Mesh | None = None,
  token_axes: str | tuple[str, ...] | None = None,
  grad_in_forward: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""Cross-entropy of the logits ``e @ c.T`` against integer labels, without the logits.

  For token ``n`` with hidden state ``e_n``, classifier rows ``c_v`` and label ``t_n``:

  .. math::
    z_{nv} = s \tanh((e_n \cdot c_v + b_v) / s), \quad L_n = \log \sum_v e^{z_{nv}},

    \ell_n = L_n - (1 - a) z_{n t_n} - \frac{a}{V} \sum_v z_{nv} + k L_n^2,

  with ``s = softcap`` (``z = x`` when None), ``a = label_smoothing``, ``k = z_loss``, and
  ``loss_n = 0`` where ``t_n == ignore_index``. All reductions run in float32. The N x V logit
  matrix is never stored: the forward streams over vocabulary blocks, the backward recomputes
  them block by block and skips the matrix products of blocks whose softmax gradient is
  negligible (``filter_eps``). The exact statement of loss and gradient is ``docs/math.md``.

  With ``filter_eps=None`` this equals the masked mean of
  ``optax.softmax_cross_entropy_with_integer_labels(e @ c.T, labels)`` up to float rounding.

  Args:
    e: hidden states, shape (..., T, D), float32, bfloat16 or float16 (float64 also works).
    c: classifier (or tied embedding table), shape (V, D), same dtype as ``e``; shape (D, V)
      with ``classifier_layout="dv"`` (a Flax ``Dense`` kernel), which is read in place: no
      transposed copy is made.
    labels: integer targets, shape (..., T) (``e.shape[:-1]``), any integer dtype; values
      beyond int32 are out of range, never wrapped.
    bias: optional classifier bias, shape (V,), any float dtype. ``-inf`` masks a class (zero
      probability and gradient), as with materialized logits.
    weights: optional per-token weights ``w``, shape ``labels.shape``, any float dtype or
      bool (optax's ``where``: False drops the token). ``weights[..., i]`` goes with
      ``labels[..., i]`` (shifted with them under ``shift``). Each token's loss is multiplied
      by its weight: ``"none"`` returns ``w_n loss_n``, ``"sum"`` the weighted sum, ``"mean"``
      the weighted sum over the sum of the counted tokens' weights (0, with zero gradients,
      when that sum is 0). Weights may be negative (RL advantages); the ``"mean"`` denominator
      is then the signed sum, which can be small: prefer ``"sum"`` and a normalizer of your
      own. Float weights get their exact gradient (the loss of each token, for ``"sum"``);
      filtering scales each token's rule by ``|w_n|`` (a zero weight lets its tiles go).
      Weights at ignored tokens are never read.
    ignore_index: label value of tokens that carry no loss and no gradient.
    softcap: logit soft-capping value ``s`` (Gemma 2 uses 30.0), or None.
    reduction: ``"mean"`` over non-ignored tokens (0.0 when there are none, with zero
      gradients), ``"sum"``, or ``"none"`` (per-token losses, 0.0 at ignored tokens); with
      ``weights``, see there.
    shift: ``k`` (``True`` means 1): position ``i`` of ``e`` predicts ``labels[..., i + k]``
      inside each sequence, i.e. ``e[..., :-k, :]`` against ``labels[..., k:]``, without
      copying ``e``. Per-token outputs then have shape (..., T - k).
    z_loss: weight ``k`` of the ``k * lse**2`` term added per non-ignored token.
    label_smoothing: weight ``a`` of the uniform target over the V classes, in [0, 1).
    filter_eps: the backward skips a tile whose every softmax-gradient entry is below this
      (``docs/math.md`` gives the rule). ``"auto"`` is ``finfo(e.dtype).eps / 32`` (2**-12
      for bfloat16); None is exact. The forward value never changes. See ``filter_c_grad``.
    filter_e_grad: apply filtering to the gradient of ``e``.
    filter_c_grad: apply filtering to the gradient of ``c``. Filtering drops many tiny
      entries from each row of dC, which early in training (near-uniform softmax) can remove
      most of the gradient of rare classes: set False when pretraining from scratch.
    return_lse: also return the per-token log-sum-exp (f32, shape of the ``"none"`` output,
      true values at ignored tokens too), which is differentiable.
    impl: ``"auto"`` (``cce_jax.dispatch.AUTO_IMPL`` per backend: ``"xla"`` everywhere until
      a Pallas kernel is measured faster on real hardware), ``"xla"`` (chunked pure JAX, every
      backend), ``"reference"`` (materialized f32 logits; for tests and small problems),
      ``"pallas_gpu"`` (Pallas Triton kernels, CUDA), ``"pallas_tpu"`` (Pallas Mosaic) or
      ``"pallas_mosaic_gpu"`` (Pallas Mosaic GPU forward, Hopper+, 16-bit inputs).
    interpret: run a Pallas implementation in interpret mode; ignored by the others.
    classifier_layout: ``"vd"`` when ``c`` is (V, D), ``"dv"`` when it is (D, V).
    block_sizes: tile sizes of the implementation: :class:`BlockSizes` for "xla" (default
      ``BlockSizes.get_default(e.dtype)``), the Pallas implementations' own dataclasses for
      theirs. Every valid block size gives correct results.
    sort_vocab: let the backward visit classes by descending average logit so that skippable
      tiles cluster. Never changes the result beyond rounding.
    check_labels: raise ValueError for a label outside [0, V) that is not ``ignore_index``.
      Without it such a token's loss is NaN (so is the mean, and so are the gradients): never
      a plausible finite value. Under ``jax.jit`` the check runs on the device values through
      ``jax.debug.callback`` and surfaces as a ``JaxRuntimeError`` carrying the message.
    vocab_axis: mesh axis name (or tuple of names) over which ``c`` (and ``bias``) is split
      along the vocabulary in equal contiguous slices. Inside ``jax.shard_map`` (no
      ``mesh``): ``c`` is this device's slice, ``labels`` hold global class ids, the lse is
      combined across the axis in f32, and the gradient of ``e`` is summed across it by
      JAX's transpose (with ``check_vma`` on or off). With ``mesh``: the axis to split ``c``
      over. None: this device holds the whole vocabulary.
    mesh: run the loss per device through ``jax.shard_map`` over this mesh (under
      ``jax.jit`` or eagerly): the leading axis of ``e``/``labels`` is split over
      ``token_axes``, ``c`` over ``vocab_axis``; "mean" divides by the global count of
      non-ignored tokens. Meshes with Explicit axes get their inputs resharded to that layout
      first (``jax.sharding.reshard``); Auto axes are left to ``shard_map``. See
      :mod:`cce_jax.sharding`.
    token_axes: mesh axes that split the tokens (the leading axis of ``e``). Inside
      ``shard_map`` without ``mesh``, "mean"/"sum" are reduced over these axes too (psum).
    grad_in_forward: compute the gradient in the forward, while the logits are at hand, and
      only scale it by the cotangent in the backward: three matrix passes over the logits
      instead of four (``cce_jax.grad_in_forward``). Same loss and gradients (filtering
      included). Costs memory: an f32 (token_block, V) logits buffer (the default tiles keep
      it under 64 MiB) and the f32 gradients of ``e``, ``c`` and ``bias`` held from the
      forward to the backward. For ``reduction`` "mean"/"sum" with ``impl`` "xla" ("auto"
      picks it) only: ``reduction="none"``, ``return_lse``, a ``vocab_axis`` of more than
      one device and another ``impl`` raise ValueError naming it, and so does ``jax.vmap``
      of the gradient. Under ``jax.checkpoint``/``nnx.remat`` the forward and its gradient
      run twice: leave the loss outside the checkpoint. Without a gradient only the
      ordinary forward runs.

  Returns:
    The loss, float32: a scalar for ``"mean"``/``"sum"``, shape (..., T - shift) for
    ``"none"``; with ``return_lse`` the pair ``(loss, lse)``.

  Raises:
    TypeError: an argument of the wrong type or dtype (the message names it).
    ValueError: inconsistent shapes, an out-of-range option, or a mesh layout that does not
      fit the arrays (an axis the mesh lacks, V or the token count not divisible by the axis
      sizes, labels split unlike the tokens); the message names the argument. A Pallas
      ``impl`` on a backend its kernels do not compile for, without ``interpret=True``.
    NotImplementedError: an implementation this installation does not ship; and, when
      differentiated, a derivative of the gradient (``jax.hessian``, grad of grad): the loss
      supports first-order reverse mode only.

  Example:
    >>> import jax, jax.numpy as jnp, cce_jax
    >>> e = jax.random.normal(jax.random.key(0), (2, 5, 16))   # (B, T, D)
    >>> c = jax.random.normal(jax.random.key(1), (100, 16))    # (V, D)
    >>> labels = jax.random.randint(jax.random.key(2), (2, 5), 0, 100)
    >>> loss = cce_jax.linear_cross_entropy(e, c, labels, shift=1)
    >>> loss.shape, loss.dtype
    ((), dtype('float32'))

    Exact (``filter_eps=None``), it is the mean cross-entropy of the materialized logits:

    >>> logits = jnp.einsum("btd,vd->btv", e[:, :-1], c)
    >>> log_p = jax.nn.log_softmax(logits)
    >>> naive = -jnp.mean(jnp.take_along_axis(log_p, labels[:, 1:, None], axis=-1))
    >>> exact = cce_jax.linear_cross_entropy(e, c, labels, shift=1, filter_eps=None)
    >>> bool(jnp.allclose(exact, naive, rtol=1e-5))
    True
  """
  reduction = checks.check_choice("reduction", reduction, checks.REDUCTIONS)
  return_lse = checks.check_bool("return_lse", return_lse)
  fused = checks.check_bool("grad_in_forward", grad_in_forward)
  requested_impl = impl
  # grad_in_forward exists for "xla" only: "auto" means "xla" with it.
  impl = "xla" if fused and impl == "auto" else impl
  impl = resolve_impl(impl, dtype=getattr(e, "dtype", None))
  layout = checks.check_choice("classifier_layout", classifier_layout, checks.CLASSIFIER_LAYOUTS)
  token_axes = sharding.check_axes("token_axes", token_axes)
  vocab_axes = sharding.check_axes("vocab_axis", vocab_axis)
  if mesh is not None:
    sharding.check_mesh_layout(mesh, e, c, labels, layout, token_axes, vocab_axes, shift)
  elif vocab_axes or token_axes:
    sharding.check_bound_axes(token_axes, vocab_axes)
  if fused:
    if vocab_axes and sharding.axes_size(mesh, vocab_axes) == 1:
      vocab_axes = None  # a vocabulary "split" over one device splits nothing
    fused_grad.check_applies(
      reduction=reduction,
      return_lse=return_lse,
      impl=impl,
      vocab_axis=vocab_axes,
      requested_impl=requested_impl,
    )
  opts, shift = _prepare(
    e,
    c,
    labels,
    bias,
    impl=impl,
    shift=shift,
    classifier_layout=layout,
    ignore_index=ignore_index,
    softcap=softcap,
    z_loss=z_loss,
    label_smoothing=label_smoothing,
    filter_eps=filter_eps,
    filter_e_grad=filter_e_grad,
    filter_c_grad=filter_c_grad,
    sort_vocab=sort_vocab,
    block_sizes=block_sizes,
    interpret=interpret,
    vocab_axis=vocab_axes,
  )
  num_classes = c.shape[opts.vocab_dim]
  if fused and block_sizes is None:
    opts = dataclasses.replace(
      opts, block_sizes=fused_grad.default_block_sizes(opts.block_sizes, num_classes)
    )
  if vocab_axes and mesh is None:
    # Inside the user's shard_map c is this device's slice; with mesh= it is the global array.
    num_classes *= sharding.axes_size(None, vocab_axes)
  if weights is not None:
    checks.check_weights(weights, labels)
  if checks.check_bool("check_labels", check_labels):
    checks.check_label_values(labels, num_classes, opts.ignore_index, shift)
  labels = checks.labels_as_int32(labels, num_classes)
  per_device = functools.partial(
    _linear_cross_entropy,
    opts=opts,
    reduction=reduction,
    shift=shift,
    return_lse=return_lse,
    impl=impl,
    token_axes=token_axes,
    fused=fused,
  )
  if mesh is None:
    return per_device(e, c, labels, bias, weights)
  return sharding.run_sharded(
    per_device,
    mesh,
    e,
    c,
    labels,
    bias,
    weights,
    token_axes=token_axes,
    vocab_axes=vocab_axes,
    vocab_dim=opts.vocab_dim,
    per_token=reduction == "none",
    return_lse=return_lse,
    # Pallas implementations run with check_vma off (their interpret mode cannot track
    # varying axes); the gradients are right either way (cce_jax.differentiable).
    check_vma=not dispatch.implementation(impl).is_pallas,
  )


def filter_stats(
  e: jax.Array,
  c: jax.Array,
  labels: jax.Array,
  *,
  bias: jax.Array | None = None,
  weights: jax.Array | None = None,
  ignore_index: int = -100,
  softcap: float | None = None,
  shift: int | bool = 0,
  z_loss: float = 0.0,
  label_smoothing: float = 0.0,
  filter_eps: float | str | None = "auto",
  filter_e_grad: bool = True,
  filter_c_grad: bool = True,
  classifier_layout: str = "vd",
  block_sizes: Any = None,
  sort_vocab: bool = True,
  impl: str = "auto",
  interpret: bool = False,
) -> dict[str, jax.Array]:
  """How many backward tiles of ``linear_cross_entropy(impl=impl)`` filtering skips.

  Takes the arguments of :func:`linear_cross_entropy` that shape the backward's tiles and its
  skip rule, runs the same forward, and evaluates the same per-tile skip table
  (``cce_jax.filtering.skip_table``) as the backward of the loss (without ``return_lse``)
  does; no gradient is computed. ``impl``, ``interpret``, ``block_sizes`` and ``weights`` are
  those of :func:`linear_cross_entropy`; "reference" has one tile, never skipped.

  Returns:
    ``{"skipped_tiles": () int32, "total_tiles": () int32, "skipped_fraction": () float32}``;
    0 skipped when filtering is off (``filter_eps=None``, both ``filter_*_grad`` False, or
    softcap with label smoothing). With only one of ``filter_e_grad``/``filter_c_grad`` on,
    a skipped tile still recomputes its logits for the other product.

  Raises:
    TypeError, ValueError, NotImplementedError: as :func:`linear_cross_entropy`.

  Example:
    >>> import jax, cce_jax
    >>> e = jax.random.normal(jax.random.key(0), (300, 32))  # (N, D)
    >>> c = jax.random.normal(jax.random.key(1), (1000, 32))  # (V, D)
    >>> labels = jax.random.randint(jax.random.key(2), (300,), 0, 1000)
    >>> blocks = cce_jax.BlockSizes(token_block=64, vocab_block=128)
    >>> stats = cce_jax.filter_stats(e, c, labels, block_sizes=blocks, filter_eps=1e-3)
    >>> int(stats["total_tiles"])  # ceil(300 / 64) x ceil(1000 / 128)
    40
    >>> int(cce_jax.filter_stats(e, c, labels, filter_eps=None)["skipped_tiles"])
    0
  """
  impl = resolve_impl(impl, dtype=getattr(e, "dtype", None))
  opts, shift = _prepare(
    e,
    c,
    labels,
    bias,
    impl=impl,
    shift=shift,
    classifier_layout=classifier_layout,
    ignore_index=ignore_index,
    softcap=softcap,
    z_loss=z_loss,
    label_smoothing=label_smoothing,
    filter_eps=filter_eps,
    filter_e_grad=filter_e_grad,
    filter_c_grad=filter_c_grad,
    sort_vocab=sort_vocab,
    block_sizes=block_sizes,
    interpret=interpret,
  )
  if weights is not None:
    checks.check_weights(weights, labels)
  labels = checks.labels_as_int32(labels, c.shape[opts.vocab_dim])
  table = _skip_table(e, c, labels, bias, weights, opts=opts, shift=shift, impl=impl)
  skipped = jnp.sum(table, dtype=jnp.int32)
  total = jnp.asarray(table.size, jnp.int32)
  return {
    "skipped_tiles": skipped,
    "total_tiles": total,
    "skipped_fraction": skipped.astype(jnp.float32) / total.astype(jnp.float32),
  }


@functools.partial(jax.jit, static_argnames=("opts", "shift", "impl"))
def _skip_table(
  e, c, labels, bias, weights, *, opts: LossOptions, shift: int, impl: str
) -> jax.Array:
  """(token blocks, vocab blocks) bool: the tiles the backward of the loss skips."""
  num_classes = c.shape[opts.vocab_dim]
  labels = _target_labels(labels, shift, opts.ignore_index)
  filter_weights = None
  if weights is not None:
    filter_weights = jnp.abs(_target_weights(weights, labels != opts.ignore_index, shift))
    filter_weights = filter_weights.reshape(-1)
  labels = labels.reshape(-1)
  e = e.reshape(-1, e.shape[-1])
  held = differentiable.local_labels(labels, 0, num_classes, num_classes, opts)
  kinds = loss_math.label_kinds(labels, num_classes, opts.ignore_index)
  g = jnp.where(kinds.ignored, 0.0, jnp.where(kinds.out_of_range, jnp.nan, 1.0))
  if filter_weights is not None:
    g = g * filter_weights

  def scale(lse):
    # The filter scale of the loss alone (no lse cotangent), each counted token weighted 1
    # (or by its weight).
    d_lse, d_target = g * (1.0 + 2.0 * opts.z_loss * lse), -(1.0 - opts.label_smoothing) * g
    return differentiable.backward_coefficients(d_lse, d_target, None, opts, filter_weights)[1]

  inputs = TiledInputs(e, c, held, bias)
  return dispatch.implementation(impl).skip_table(inputs, scale, opts)
