"""Cut Cross-Entropy on CUDA GPUs: ``impl="pallas_gpu"``, Pallas kernels on the Triton lowering.

What runs (``cce_jax.tiled``'s contract; the loss formula, reductions, shift, sharding and the
per-token gradient coefficients stay in ``cce_jax.differentiable``):

* forward (:func:`pallas_kernels.gpu.kernels.forward_kernel`): per (token block, vocabulary
  split) an online log-sum-exp in f32 over vocabulary tiles whose logits stay in registers;
  the target logit by an indexed dot; the logit sum with label smoothing; for a backward with
  filtering, the row maximum of every (vocabulary block, token).
* backward: two kernels, each the only writer of its output rows: one over token blocks for
  dE, one over vocabulary blocks for dC and the bias. A tile ``cce_jax.filtering.skip_table``
  marks is a branch that does nothing, in the kernel whose filter flag is on.
* the vocabulary sort: each tile gathers its rows of ``c`` by class id inside the kernel, never
  a permuted copy of ``c``; dC rows and bias entries are written back by the same ids.

Tiling (``cce_jax.filtering.AxisTiling``): tokens "mask", classes and hidden units "overlap";
D >= 16 and V >= 16. Under ``jax.vmap`` the forward folds the examples into one call over all
tokens and the backward runs them one after another (``cce_jax.tiled``), as for "xla".
Interpret mode (``interpret=True``) runs the same kernels on a CPU. Why two kernels and what
they cost, and what has been measured on hardware: ``benchmarks/RESULTS.md`` ("Pallas GPU").
"""

from __future__ import annotations

from cce_jax.tiled import Implementation, examples_in_sequence, fold_examples
from pallas_kernels.gpu.block_sizes import SHARED_MEMORY_LIMITS, GPUBlockSizes
from pallas_kernels.gpu.implementation import (
  backward,
  forward,
  resolve_block_sizes,
  skip_table,
)

IMPLEMENTATION = Implementation(
  name="pallas_gpu",
  # Under vmap the forward is one kernel call over every example's tokens (block maxima
  # (vocab blocks, N)); the backward runs the examples one after another, so that a skipped
  # tile stays a real branch.
  forward=fold_examples(forward, block_max_token_axis=1),
  backward=examples_in_sequence(backward),
  skip_table=skip_table,
  resolve_block_sizes=resolve_block_sizes,
  is_pallas=True,
  backends=("gpu",),
)

__all__ = [
  "IMPLEMENTATION",
  "SHARED_MEMORY_LIMITS",
  "GPUBlockSizes",
  "backward",
  "forward",
]
