"""Cut Cross-Entropy in Pallas for TPUs (Mosaic): ``impl="pallas_tpu"``.

A tiled implementation in the sense of :mod:`cce_jax.tiled`, registered by
:data:`IMPLEMENTATION` (imported lazily by :mod:`cce_jax.dispatch`). Kernels in
:mod:`.kernels`, tile sizes and their VMEM heuristic in :mod:`.block_sizes`, the JAX around the
kernels (vocabulary sort, skip table) in :mod:`.implementation`. ``opts.interpret`` runs the
kernels in TPU interpret mode (``pltpu.InterpretParams()``), on any backend.
"""

from __future__ import annotations

from cce_jax.tiled import TiledImplementation
from pallas_kernels.tpu.block_sizes import TPUBlockSizes, kernel_vmem_bytes, resolve
from pallas_kernels.tpu.implementation import vmappable_backward, vmappable_forward

IMPLEMENTATION = TiledImplementation(
    name="pallas_tpu",
    forward=vmappable_forward,
    backward=vmappable_backward,
    block_sizes_type=TPUBlockSizes,
    default_block_sizes=TPUBlockSizes.get_default,
    uses_interpret=True,
)

__all__ = ["IMPLEMENTATION", "TPUBlockSizes", "kernel_vmem_bytes", "resolve"]
