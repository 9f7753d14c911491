"""Cut Cross-Entropy on CUDA GPUs: ``impl="pallas_gpu"``, Pallas kernels on the Triton lowering.

What runs (``cce_jax.tiled``'s contract; the loss formula, reductions, shift, sharding and the
per-token gradient coefficients stay in ``cce_jax.differentiable``):

* forward (:func:`pallas_kernels.gpu.kernels.forward_kernel`): per (token block, vocabulary
  split) an online log-sum-exp in f32 over vocabulary tiles whose logits are accumulated over
  chunks of D in registers and never written to memory; bias and softcap applied in the tile;
  the target logit by an indexed dot (gathered rows of ``c``); the logit sum with label
  smoothing; for a backward with filtering, the row maximum of every (token, vocabulary block),
  from which the backward's skip test is read before anything is recomputed.
* backward: two kernels, each owning its output rows. One runs over token blocks and, for each,
  over the vocabulary blocks: recompute the tile, form the softmax gradient, ``dE += G @ C``.
  The other runs over vocabulary blocks and, for each, over the token blocks: recompute,
  ``dC += G^T @ E`` and ``db += sum_n G``. A tile the skip table marks is a branch that does
  nothing, in the kernel whose filter flag (``filter_e_grad`` / ``filter_c_grad``) is on.
* the vocabulary sort: classes are visited in ``cce_jax.vocab_sort.vocab_order``; each tile
  gathers its rows of ``c`` by class id inside the kernel (``c_ref[ids, pl.ds(d0, bd)]``),
  never a permuted copy of ``c``; dC rows and bias entries are written back by the same ids.

Accumulation scheme (chosen without a GPU to measure on; ``benchmarks/gpu.py`` is the
measurement to make): the two-kernel scheme. Every output row has one writer, so the result is
deterministic, needs no zero-initialised atomics buffer or lock, and the filter flags map onto
the kernels directly (with ``filter_c_grad=False`` the dC kernel simply never skips). Its cost
is one extra recompute of the logits (five N x V x D passes in all against four for a single
kernel with ``atomic_add`` on dE and dC, as apple's Triton CCE does), and a read-modify-write
of the program's own f32 rows of dE / dC per tile instead of atomics. With 16-bit inputs the
dC kernel accumulates into an f32 (V, D) buffer (cast to the dtype of ``c`` at the end): that
is V x D x 4 bytes of temporary memory that a bf16 accumulation (lossy) or Kahan compensation
(as large) would also need. An atomic single-kernel variant is the alternative to measure.

Ragged sizes: token blocks are masked at the end; vocabulary and hidden blocks overlap at the
end (the last block starts at ``size - block``, its repeated entries masked out), so every
load of ``c`` is in bounds and ``c`` is never padded. Triton needs D >= 16 and V >= 16.

64-bit offsets: the lowering computes element offsets in 64-bit arithmetic for any array of
more than 2**32 bytes (checked on the lowered Triton IR by ``tests/test_pallas_gpu.py``); the
kernels' own index arithmetic is per-axis and stays far below 2**31.

Lowering: Pallas' Triton lowering (``jax.experimental.pallas.triton``), which runs on Ampere
(A100) and Hopper (H100) and in interpret mode on a CPU (``opts.interpret``). Every
``pallas_call`` passes ``plgpu.CompilerParams`` explicitly (without them a GPU ``pallas_call``
lowers through Mosaic GPU). The Triton lowering is deprecated from JAX 0.11 in favour of Mosaic
GPU (Hopper and newer only); the kernel math lives in backend-neutral helpers
(:mod:`pallas_kernels.gpu.tile_math` on top of ``cce_jax.loss_math``) so that a Mosaic GPU
variant can reuse it.
"""

from __future__ import annotations

from cce_jax.tiled import TiledImplementation
from pallas_kernels.gpu.block_sizes import SHARED_MEMORY_LIMITS, GPUBlockSizes
from pallas_kernels.gpu.ops import backward, default_block_sizes, forward

IMPLEMENTATION = TiledImplementation(
    name="pallas_gpu",
    forward=forward,
    backward=backward,
    block_sizes_type=GPUBlockSizes,
    default_block_sizes=default_block_sizes,
    uses_interpret=True,
)

__all__ = [
    "IMPLEMENTATION",
    "SHARED_MEMORY_LIMITS",
    "GPUBlockSizes",
    "backward",
    "forward",
]
