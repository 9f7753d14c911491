"""``impl="pallas_mosaic_gpu"``'s forward: the tiled contract around the Mosaic GPU kernel.

What runs outside the kernel, in plain JAX: the vocabulary sort (``vocab_sort.vocab_order``),
the target logit by an indexed dot, and, where the kernel's shape rules need it, padding: D to
a multiple of 64 (a copy of ``e`` and ``c``; model widths are multiples of 64 in practice), N
to 64 rows and V to one vocabulary block when the problem is smaller than that. For a backward
that filters with ``sort_vocab``, the kernel visits a sorted copy of ``c`` (Hopper's TMA cannot
gather rows): one (V, D) temporary, as in the TPU kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu

from cce_jax import filtering, loss_math, vocab_sort, xla_chunked
from cce_jax.options import LossOptions
from cce_jax.tiled import LocalForward, Residuals, TiledInputs
from pallas_kernels.mosaic_gpu import kernel
from pallas_kernels.mosaic_gpu.block_sizes import HIDDEN_CHUNK, TOKEN_ROWS

DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def interpret_params(interpret: bool):
  """``opts.interpret`` as the kernel takes it: None, or Mosaic GPU's interpret mode.

  Raises:
    NotImplementedError: ``interpret`` on a JAX without Mosaic GPU's interpret mode (< 0.11).
  """
  if not interpret:
    return None
  if not hasattr(plgpu, "InterpretGPUParams"):
    raise NotImplementedError(
      f"`interpret`=True with impl='pallas_mosaic_gpu' needs JAX >= 0.11 (Mosaic GPU's "
      f"interpret mode); this is JAX {jax.__version__}."
    )
  return plgpu.InterpretGPUParams()


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
  """``x`` zero-padded along ``axis`` to at least ``size``."""
  missing = size - x.shape[axis]
  if missing <= 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, missing)
  return jnp.pad(x, widths)


def forward(inputs: TiledInputs, opts: LossOptions, for_backward: bool) -> LocalForward:
  """Per-token lse, target logit and logit sum (``cce_jax.tiled.LocalForward``); for a
  backward, the class order and, when filtering, the largest logit per (vocabulary block,
  token) in that order, as the "xla" backward reads them.

  Raises:
    TypeError: ``e`` is not float16 or bfloat16 (the kernel multiplies on Hopper tensor cores,
      which would round float32 to tf32).
    NotImplementedError: ``opts.interpret`` on JAX < 0.11.
  """
  e, c, local_labels, bias = inputs
  if np.dtype(e.dtype) not in DTYPES:
    raise TypeError(
      f"impl='pallas_mosaic_gpu' takes float16 or bfloat16 `e` and `c`, got {e.dtype}; "
      "use impl='xla' or impl='pallas_gpu' for float32 (tensor cores would round it to tf32)."
    )
  interpret = interpret_params(opts.interpret)
  axis = opts.vocab_dim
  num_tokens, hidden = e.shape
  num_classes = c.shape[axis]
  block = opts.block_sizes.vocab_block
  want_block_max = for_backward and opts.filters_anything
  order = vocab_sort.vocab_order(e, c, bias, opts) if for_backward else None
  visit_c, visit_bias = c, bias
  if want_block_max and opts.sort_vocab:  # the backward's blocks are blocks of sorted classes
    visit_c = jnp.take(c, order, axis=axis)
    visit_bias = None if bias is None else bias[order]

  padded_hidden = filtering.cdiv(hidden, HIDDEN_CHUNK) * HIDDEN_CHUNK
  padded_e = _pad(_pad(e, 1, padded_hidden), 0, TOKEN_ROWS)
  padded_c = _pad(_pad(visit_c, 1 - axis, padded_hidden), axis, block)
  padded_bias = None if visit_bias is None else _pad(visit_bias.astype(jnp.float32), 0, block)
  cfg = kernel.KernelConfig(
    num_classes=num_classes,
    vocab_block=block,
    vocab_dim=axis,
    softcap=opts.softcap,
    with_bias=bias is not None,
    want_logit_sum=opts.label_smoothing > 0.0,
    want_block_max=want_block_max,
  )
  stats = list(kernel.forward_stats(padded_e, padded_c, padded_bias, cfg, interpret))
  lse = stats.pop(0)[:num_tokens]
  logit_sum = stats.pop(0)[:num_tokens] if cfg.want_logit_sum else None
  block_max = stats.pop(0)[:, :num_tokens] if want_block_max else None
  target = loss_math.target_logits(e, c, local_labels, bias, opts)
  return LocalForward(
    lse=lse,
    target=target,
    logit_sum=logit_sum,
    residuals=Residuals(order, block_max) if for_backward else None,
  )


# The tiles the paired "xla" backward skips: it reads this forward's block maxima.
skip_table = xla_chunked.skip_table_of(forward)
