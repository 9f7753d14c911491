"""``cce_jax.token_stats`` with ``impl="pallas_gpu"``: the forward kernel's token statistics.

The forward is :func:`pallas_kernels.gpu.kernels.forward_kernel` with
``KernelConfig.want_token_stats``: per (token block, vocabulary split) program the online
log-sum-exp also keeps ``t = sum exp(z - max) (z - max)`` and the argmax
(:mod:`pallas_kernels.stats_tile`), and split 0 takes the label logit by an indexed dot, as for
the loss; the splits are merged here (:func:`pallas_kernels.stats_tile.merge_splits`). The
vocabulary is visited in its own order (no sort). The backward is not a kernel: see
``cce_jax.stats.stats_implementation``.
"""

from __future__ import annotations

import jax.numpy as jnp

from cce_jax.local_stats import LocalStats
from cce_jax.options import LossOptions
from cce_jax.tiled import TiledInputs
from pallas_kernels import stats_tile
from pallas_kernels.gpu import kernels
from pallas_kernels.gpu.implementation import _with_bias, kernel_config, with_vocab_splits


def forward(inputs: TiledInputs, opts: LossOptions) -> LocalStats:
  """:class:`cce_jax.local_stats.LocalStats` of ``inputs`` over its classes, each (N,).

  Raises:
    TypeError: ``opts.block_sizes`` not a ``GPUBlockSizes``.
    ValueError: D or V below 16, or tiles over the shared-memory limit.
  """
  e, c, local_labels, bias = inputs  # (N, D), (V, D) or (D, V), (N,), (V,) or None
  cfg = _with_bias(kernel_config(e, c, opts, gathered=False, want_token_stats=True), bias)
  cfg, splits = with_vocab_splits(cfg, opts)
  out = kernels.forward_call(e, c, local_labels.astype(jnp.int32), bias, None, cfg, splits)
  lse, entropy, peak, argmax = stats_tile.merge_splits(
    out.max_SN, out.sum_SN, out.t_SN, out.argmax_SN
  )
  return LocalStats(lse=lse, entropy=entropy, target=out.target, peak=peak, argmax=argmax)
