"""``impl="pallas_gpu"``: ``cce_jax.tiled``'s contract on the kernels of :mod:`.kernels`.

Around :mod:`pallas_kernels.gpu.kernels` this module only: checks shapes and the shared-memory
budget, computes the class order of the vocabulary sort (``cce_jax.vocab_sort``), merges the
forward's per-split partial log-sum-exps, and hands the kernels ``cce_jax.filtering``'s skip
table (as int32, one word per tile) and exact uniform smoothing term.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cce_jax import filtering, vocab_sort
from cce_jax.loss_math import TokenCoefficients
from cce_jax.options import LossOptions
from cce_jax.tiled import LocalForward, LocalGrads, Residuals, TiledInputs, resolve_block_sizes_of
from pallas_kernels.gpu import kernels, tile_math
from pallas_kernels.gpu.block_sizes import MIN_BLOCK, GPUBlockSizes


def kernel_config(
  e: jax.Array, c: jax.Array, opts: LossOptions, gathered: bool, **kwargs
) -> kernels.KernelConfig:
  """The static launch description for these shapes and options.

  Raises:
    TypeError: ``opts.block_sizes`` is not a :class:`GPUBlockSizes`.
    ValueError: D or V below 16 (Triton's smallest matrix product), or tiles over the
      shared-memory limit for ``e.dtype``.
  """
  sizes = opts.block_sizes
  if not isinstance(sizes, GPUBlockSizes):
    raise TypeError(
      f"impl='pallas_gpu' needs `block_sizes` of type GPUBlockSizes, got {type(sizes).__name__}."
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
  inputs: TiledInputs,
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
  e, c, local_labels, bias = inputs  # (N, D), (V, D) or (D, V), (N,), (V,) or None
  gathered = for_backward and opts.sort_vocab
  want_block_max = for_backward and opts.filters_anything
  cfg = kernel_config(
    e,
    c,
    opts,
    gathered,
    want_logit_sum=opts.label_smoothing > 0.0,
    want_block_max=want_block_max,
  )
  cfg, splits = with_vocab_splits(_with_bias(cfg, bias), opts)
  order = vocab_sort.vocab_order(e, c, bias, opts) if gathered else None
  out = kernels.forward_call(
    e, c, local_labels.astype(jnp.int32), bias, order, cfg, splits, debug=debug
  )
  lse = tile_math.merge_partial_lse(out.max_SN, out.sum_SN)
  logit_sum = jnp.sum(out.logit_sum_SN, axis=0) if cfg.want_logit_sum else None
  residuals = None
  if for_backward:
    residuals = Residuals(order, out.block_max if want_block_max else None)
  return LocalForward(lse, out.target, logit_sum, residuals)


def with_vocab_splits(
  cfg: kernels.KernelConfig, opts: LossOptions
) -> tuple[kernels.KernelConfig, int]:
  """``cfg`` with the forward's vocabulary blocks per split, and the number of splits (none
  empty), from ``opts.block_sizes.vocab_splits``."""
  blocks = cfg.classes.count
  per_split = filtering.cdiv(blocks, min(opts.block_sizes.vocab_splits, blocks))
  return _replace(cfg, blocks_per_split=per_split), filtering.cdiv(blocks, per_split)


def backward(
  inputs: TiledInputs,
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
  blocks for dC and the bias (with a 16-bit c, persistent programs that each reuse one f32
  (class block, D) buffer: no (V, D) f32 array). A tile the skip table marks is skipped in the
  kernel whose filter flag is on.
  """
  e, c, local_labels, bias = inputs
  order, block_max = residuals
  labels = local_labels.astype(jnp.int32)
  base = kernel_config(
    e, c, opts, order is not None, product_dtype=filtering.product_dtype(e.dtype).name
  )
  base = _with_bias(base, bias)
  skip = None
  if filter_scale is not None and opts.filters_anything:
    if block_max is None:
      raise ValueError(
        "filter_scale given but the forward kept no block maxima "
        "(was it called with for_backward=True and the same options?)."
      )
    table = filtering.skip_table(
      block_max,
      lse,
      filter_scale,
      labels,
      order,
      base.tokens,
      base.classes,
      opts.filter_eps,
      block_max_token_axis=1,
    )
    skip = table.astype(jnp.int32)  # the kernels read one int32 per tile
  f32 = jnp.float32
  class_sum = weighted_e = gamma_sum = None
  if filtering.uniform_outside(opts):
    # The uniform smoothing term, exactly, outside the tiles (docs/math.md).
    class_sum, weighted_e, gamma_sum = filtering.uniform_terms(e, c, coeffs.gamma, opts)
    gamma_sum = gamma_sum.reshape(1)
  coeffs = TokenCoefficients(*(x.astype(f32) for x in coeffs))
  lse = lse.astype(f32)
  cfg_e = _replace(base, skip=skip is not None and opts.filter_e_grad)
  cfg_c = _grad_c_config(
    _replace(base, skip=skip is not None and opts.filter_c_grad), c.dtype, opts.block_sizes
  )
  d_e = kernels.grad_e_call(
    e,
    c,
    labels,
    bias,
    order,
    lse,
    coeffs,
    class_sum,
    skip if cfg_e.skip else None,
    cfg_e,
    debug=debug,
  )
  d_c, d_bias = kernels.grad_c_call(
    e,
    c,
    labels,
    bias,
    order,
    lse,
    coeffs,
    weighted_e,
    gamma_sum,
    skip if cfg_c.skip else None,
    cfg_c,
    debug=debug,
  )
  return LocalGrads(d_e, d_c.astype(c.dtype), d_bias if bias is not None else None)


def _grad_c_config(
  cfg: kernels.KernelConfig, d_c_dtype, sizes: GPUBlockSizes
) -> kernels.KernelConfig:
  """The dC kernel's launch: as ``cfg`` for an f32 dC (accumulated in place); for a 16-bit dC,
  ``sizes.grad_c_programs`` persistent programs over class blocks of
  ``sizes.grad_c_vocab_block`` (nested in the forward's, whose skip-table column they read),
  each accumulating in its own f32 (block, D) buffer."""
  if jnp.dtype(d_c_dtype) == jnp.float32:
    return cfg
  block = min(sizes.grad_c_vocab_block, cfg.classes.block)  # powers of two: block divides it
  classes = tile_math.overlapped_axis(cfg.classes.size, block)
  return _replace(
    cfg,
    classes=classes,
    skip_group=cfg.classes.block // block,
    grad_c_programs=min(sizes.grad_c_programs, classes.count),
  )


def skip_table(
  inputs: TiledInputs,
  filter_scale: Callable[[jax.Array], jax.Array],  # (N,) lse -> (N,) filter scale
  opts: LossOptions,
) -> jax.Array:
  """(token blocks, vocab blocks) bool: the tiles both backward kernels skip
  (``cce_jax.tiled.SkipTableFn``); runs the forward."""
  cfg = kernel_config(inputs.e, inputs.c, opts, opts.sort_vocab)
  if not opts.filters_anything:
    return jnp.zeros((cfg.tokens.count, cfg.classes.count), bool)
  out = forward(inputs, opts, for_backward=True)
  labels = inputs.local_labels.astype(jnp.int32)
  return filtering.skip_table(
    out.residuals.block_max,
    out.lse,
    filter_scale(out.lse),
    labels,
    out.residuals.order,
    cfg.tokens,
    cfg.classes,
    opts.filter_eps,
    block_max_token_axis=1,
  )


def _replace(cfg: kernels.KernelConfig, **changes) -> kernels.KernelConfig:
  return dataclasses.replace(cfg, **changes)


def _with_bias(cfg: kernels.KernelConfig, bias: jax.Array | None) -> kernels.KernelConfig:
  if bias is not None and bias.shape != (cfg.classes.size,):
    raise ValueError(f"`bias` must have shape ({cfg.classes.size},), got {bias.shape}.")
  return _replace(cfg, has_bias=bias is not None)


def default_block_sizes(dtype=None) -> GPUBlockSizes:
  """``GPUBlockSizes.get_default(dtype)`` for the GPU this process sees."""
  return GPUBlockSizes.get_default(None if dtype is None else np.dtype(dtype))


def resolve_block_sizes(block_sizes: GPUBlockSizes | None, dtype) -> GPUBlockSizes:
  """``block_sizes`` (None: :func:`default_block_sizes`), checked against the shared memory
  of its generation for inputs of ``dtype`` (``cce_jax.tiled.ResolveBlockSizesFn``).

  Raises:
    TypeError: ``block_sizes`` that is not a :class:`GPUBlockSizes`.
    ValueError: tiles over the shared-memory limit for ``dtype``.
  """
  block_sizes = _resolve_type(block_sizes, dtype)
  block_sizes.check_shared_memory(np.dtype(dtype))
  return block_sizes


_resolve_type = resolve_block_sizes_of(GPUBlockSizes, default_block_sizes)
