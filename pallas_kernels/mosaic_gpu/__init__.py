"""Cut Cross-Entropy on Hopper and newer GPUs: ``impl="pallas_mosaic_gpu"``, Pallas on Mosaic GPU.

The successor of the Triton kernels (``impl="pallas_gpu"``) chosen in ``docs/gpu_backend.md``,
started with the forward: :mod:`pallas_kernels.mosaic_gpu.kernel` computes every token's
log-sum-exp, logit sum and per-block logit maxima on the tensor cores (TMA copies, ``wgmma``),
and :mod:`pallas_kernels.mosaic_gpu.implementation` wraps it in the implementation contract
(``cce_jax.tiled``). The backward is, until its kernels are written, the chunked "xla" backward
(``cce_jax.xla_chunked.backward``), which reads the forward's residuals as its own. So every
option, ``vmap`` and the gradients work through it; float16 and bfloat16 only.

Testing without a GPU: the kernel lowers for CUDA on a CPU host on every supported JAX
(``pallas_kernels.probes.cuda_lowering``), and runs in Mosaic GPU's interpret mode
(``interpret=True``) from JAX 0.11. It has not run on a GPU yet: ``impl="auto"`` never picks
it.
"""

from __future__ import annotations

from cce_jax import xla_chunked
from cce_jax.tiled import (
  Implementation,
  examples_in_sequence,
  fold_examples,
  resolve_block_sizes_of,
)
from pallas_kernels.mosaic_gpu.block_sizes import MosaicGPUBlockSizes
from pallas_kernels.mosaic_gpu.implementation import forward, skip_table

IMPLEMENTATION = Implementation(
  name="pallas_mosaic_gpu",
  forward=fold_examples(forward, block_max_token_axis=1),
  backward=examples_in_sequence(xla_chunked.backward),
  skip_table=skip_table,
  resolve_block_sizes=resolve_block_sizes_of(MosaicGPUBlockSizes, MosaicGPUBlockSizes.get_default),
  is_pallas=True,
)

__all__ = ["IMPLEMENTATION", "MosaicGPUBlockSizes", "forward"]
