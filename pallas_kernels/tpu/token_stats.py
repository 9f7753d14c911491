"""``cce_jax.token_stats`` with ``impl="pallas_tpu"``: the forward kernel's token statistics.

The forward is :func:`pallas_kernels.tpu.kernels.forward_token_stats` (the loss's forward kernel
with its static ``with_token_stats`` flag: online entropy and argmax beside the log-sum-exp);
the label logit is an indexed dot outside the kernel, as for the loss
(``loss_math.target_logits``). The backward is not a kernel: see
``cce_jax.stats.stats_implementation``.
"""

from __future__ import annotations

from cce_jax import loss_math
from cce_jax.local_stats import LocalStats
from cce_jax.options import LossOptions
from cce_jax.tiled import TiledInputs
from pallas_kernels.tpu import kernels
from pallas_kernels.tpu.implementation import _math, check_inputs, geometry


def forward(inputs: TiledInputs, opts: LossOptions) -> LocalStats:
  """:class:`cce_jax.local_stats.LocalStats` of ``inputs`` over its classes, each (N,).

  Raises:
    TypeError: ``e`` not float32 or bfloat16, or ``opts.block_sizes`` not a ``TPUBlockSizes``.
    ValueError: tiles that do not fit VMEM, or more than ``kernels.MAX_STATS_CLASSES``
      classes.
  """
  e, c, local_labels, bias = inputs  # (N, D), (V, D) or (D, V), (N,), (V,) or None
  check_inputs(e, c, opts)
  geo = geometry(e, c, opts)
  lse, entropy, peak, argmax = kernels.forward_token_stats(
    e, c, bias, geo, _math(e, bias, opts), opts.interpret
  )
  target = loss_math.target_logits(e, c, local_labels, bias, opts)
  return LocalStats(lse=lse, entropy=entropy, target=target, peak=peak, argmax=argmax)
