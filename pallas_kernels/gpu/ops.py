"""``forward`` and ``backward`` of ``cce_jax.tiled``'s contract: thin JAX around the kernels.

Around :mod:`pallas_kernels.gpu.kernels` this module only: checks shapes and the shared-memory
budget, computes the class order of the vocabulary sort (``cce_jax.vocab_sort``), merges the
forward's per-split partial log-sum-exps, builds the backward's skip table from the forward's
per-block row maxima, and computes the three vectors of the exact uniform smoothing term.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cce_jax import vocab_sort
from cce_jax.loss_math import TokenCoefficients
from cce_jax.options import LossOptions
from cce_jax.tiled import LocalForward, LocalGrads, Residuals
from pallas_kernels.gpu import kernels, tile_math
from pallas_kernels.gpu.block_sizes import MIN_BLOCK, GPUBlockSizes, product_dtype


def kernel_config(e: jax.Array, c: jax.Array, opts: LossOptions, gathered: bool,
                  **kwargs) -> kernels.KernelConfig:
  """The static launch description for these shapes and options.

  Raises:
    TypeError: ``opts.block_sizes`` is not a :class:`GPUBlockSizes`.
    ValueError: D or V below 16 (Triton's smallest matrix product), or tiles over the
      shared-memory limit for ``e.dtype``.
  """
  sizes = opts.block_sizes
  if not isinstance(sizes, GPUBlockSizes):
    raise TypeError(
        f"impl='pallas_gpu' needs `block_sizes` of type GPUBlockSizes, got "
        f"{type(sizes).__name__}."
    )
  num_tokens, hidden = e.shape
  num_classes = c.shape[opts.vocab_dim]
  if hidden < MIN_BLOCK or num_classes < MIN_BLOCK:
    raise ValueError(
        f"impl='pallas_gpu' needs D >= {MIN_BLOCK} and at least {MIN_BLOCK} classes (Triton's "
        f"smallest matrix product), got D={hidden}, V={num_classes}; use impl='xla'."
    )
  sizes.check_shared_memory(e.dtype)
  return kernels.KernelConfig(
      opts=opts,
      tokens=tile_math.masked_axis(num_tokens, sizes.token_block),
      classes=tile_math.overlapped_axis(num_classes, sizes.vocab_block),
      hidden=tile_math.overlapped_axis(hidden, sizes.hidden_block),
      gathered=gathered,
      has_bias=False,
      **kwargs,
  )


def forward(
    e: jax.Array,  # (N, D)
    c: jax.Array,  # (V, D) or (D, V)
    local_labels: jax.Array,  # (N,) int32, -1 for none
    bias: jax.Array | None,  # (V,)
    opts: LossOptions,
    for_backward: bool,
    *,
    debug: bool = False,
) -> LocalForward:
  """Per-token lse, target logit and logit sum over the local classes (``cce_jax.tiled``).

  With ``for_backward`` the vocabulary is visited in :func:`cce_jax.vocab_sort.vocab_order`
  (when ``opts.sort_vocab``) and, when filtering is on, the row maxima of every vocabulary
  block are kept for the backward's skip test. ``debug`` prints the Triton IR at lowering.
  """
  gathered = for_backward and opts.sort_vocab
  want_block_max = for_backward and opts.filters_anything
  cfg = kernel_config(
      e, c, opts, gathered,
      want_logit_sum=opts.label_smoothing > 0.0,
      want_block_max=want_block_max,
  )
  cfg = _with_bias(cfg, bias)
  blocks = cfg.classes.count
  per_split = -(-blocks // min(opts.block_sizes.vocab_splits, blocks))
  splits = -(-blocks // per_split)  # no split is empty
  cfg = _replace(cfg, blocks_per_split=per_split)
  order = vocab_sort.vocab_order(e, c, bias, opts) if gathered else None
  out = kernels.forward_call(e, c, local_labels.astype(jnp.int32), bias, order, cfg, splits,
                             debug=debug)
  lse = tile_math.merge_partial_lse(out.max_SN, out.sum_SN)
  logit_sum = jnp.sum(out.logit_sum_SN, axis=0) if cfg.want_logit_sum else None
  residuals = None
  if for_backward:
    residuals = Residuals(order, out.block_max if want_block_max else None)
  return LocalForward(lse, out.target, logit_sum, residuals)


def backward(
    e: jax.Array,  # (N, D)
    c: jax.Array,  # (V, D) or (D, V)
    local_labels: jax.Array,  # (N,) int32
    bias: jax.Array | None,  # (V,)
    residuals: Residuals,
    lse: jax.Array,  # (N,) f32
    coeffs: TokenCoefficients,
    filter_scale: jax.Array | None,  # (N,) f32
    opts: LossOptions,
    *,
    debug: bool = False,
) -> LocalGrads:
  """dE (N, D) f32, dC (layout and dtype of c) and d_bias (V,) f32 (``cce_jax.tiled``).

  Two kernels, each owning its output rows: one over token blocks for dE, one over vocabulary
  blocks for dC and the bias. A tile the skip table marks is skipped in the kernel whose
  filter flag is on.
  """
  order, block_max = residuals
  labels = local_labels.astype(jnp.int32)
  base = kernel_config(e, c, opts, order is not None,
                       product_dtype=product_dtype(e.dtype).name)
  base = _with_bias(base, bias)
  skip = None
  if filter_scale is not None and opts.filters_anything:
    if block_max is None:
      raise ValueError("filter_scale given but the forward kept no block maxima "
                       "(was it called with for_backward=True and the same options?).")
    skip = tile_math.skip_table(block_max, lse, filter_scale, labels, order, base.tokens,
                                base.classes, opts.filter_eps)
  f32 = jnp.float32
  class_sum = weighted_e = gamma_sum = None
  if tile_math.uniform_outside(opts):
    # The uniform smoothing term, exactly, outside the tiles (docs/math.md).
    class_sum = jnp.sum(c, axis=opts.vocab_dim, dtype=f32)  # (D,)
    weighted_e = jnp.dot(coeffs.gamma.astype(f32), e.astype(f32),
                         precision=lax.Precision.HIGHEST)  # (D,)
    gamma_sum = jnp.sum(coeffs.gamma).reshape(1)
  coeffs = TokenCoefficients(*(x.astype(f32) for x in coeffs))
  lse = lse.astype(f32)
  cfg_e = _replace(base, skip=skip is not None and opts.filter_e_grad)
  cfg_c = _replace(base, skip=skip is not None and opts.filter_c_grad)
  d_e = kernels.grad_e_call(e, c, labels, bias, order, lse, coeffs, class_sum,
                            skip if cfg_e.skip else None, cfg_e, debug=debug)
  d_c, d_bias = kernels.grad_c_call(e, c, labels, bias, order, lse, coeffs, weighted_e,
                                    gamma_sum, skip if cfg_c.skip else None, cfg_c, debug=debug)
  return LocalGrads(d_e, d_c.astype(c.dtype), d_bias if bias is not None else None)


def filter_tile_counts(
    e: jax.Array,  # (N, D)
    c: jax.Array,  # (V, D) or (D, V)
    local_labels: jax.Array,  # (N,) int32
    bias: jax.Array | None,  # (V,)
    filter_scale: Callable[[jax.Array], jax.Array],  # (N,) lse -> (N,) filter scale
    opts: LossOptions,
) -> tuple[jax.Array, jax.Array]:
  """(skipped tiles, total tiles) of the backward, as () int32 arrays; runs the forward.

  The same signature as ``cce_jax.xla_chunked.filter_tile_counts``; the table is the one both
  backward kernels read (a tile counts as skipped when its skip bit is set).
  """
  cfg = kernel_config(e, c, opts, opts.sort_vocab)
  total = jnp.asarray(cfg.tokens.count * cfg.classes.count, jnp.int32)
  if not opts.filters_anything:
    return jnp.zeros((), jnp.int32), total
  out = forward(e, c, local_labels, bias, opts, for_backward=True)
  labels = local_labels.astype(jnp.int32)
  table = tile_math.skip_table(out.residuals.block_max, out.lse, filter_scale(out.lse), labels,
                               out.residuals.order, cfg.tokens, cfg.classes, opts.filter_eps)
  return jnp.sum(table, dtype=jnp.int32), total


def _replace(cfg: kernels.KernelConfig, **changes) -> kernels.KernelConfig:
  return dataclasses.replace(cfg, **changes)


def _with_bias(cfg: kernels.KernelConfig, bias: jax.Array | None) -> kernels.KernelConfig:
  if bias is not None and bias.shape != (cfg.classes.size,):
    raise ValueError(f"`bias` must have shape ({cfg.classes.size},), got {bias.shape}.")
  return _replace(cfg, has_bias=bias is not None)


def default_block_sizes(dtype=None) -> GPUBlockSizes:
  """``GPUBlockSizes.get_default(dtype)`` for the GPU this process sees."""
  return GPUBlockSizes.get_default(None if dtype is None else np.dtype(dtype))
