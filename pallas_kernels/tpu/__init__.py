"""Cut Cross-Entropy in Pallas for TPUs (Mosaic): ``impl="pallas_tpu"``.

An implementation in the sense of :mod:`cce_jax.tiled`, registered by
:data:`IMPLEMENTATION` (imported lazily by :mod:`cce_jax.dispatch`). Kernels in
:mod:`.kernels`, tile sizes and their VMEM heuristic in :mod:`.block_sizes`, the JAX around the
kernels (vocabulary sort, skip table) in :mod:`.implementation`. ``opts.interpret`` runs the
kernels in TPU interpret mode (``pltpu.InterpretParams()``), on any backend.
"""

from __future__ import annotations

from cce_jax.tiled import Implementation, examples_in_sequence, fold_examples
from pallas_kernels.tpu.block_sizes import TPUBlockSizes, kernel_vmem_bytes, resolve
from pallas_kernels.tpu.implementation import (
  backward,
  forward,
  resolve_block_sizes,
  skip_table,
)

IMPLEMENTATION = Implementation(
  name="pallas_tpu",
  # Under vmap the forward is one kernel call over every example's tokens; the backward runs
  # the examples one after another (TPU interpret mode cannot run a vmapped pallas_call).
  forward=fold_examples(forward, block_max_token_axis=0),
  backward=examples_in_sequence(backward),
  skip_table=skip_table,
  resolve_block_sizes=resolve_block_sizes,
  is_pallas=True,
  backends=("tpu",),
  # Mosaic cannot compile their bfloat16 matrix products ("Unsupported matmul RHS type");
  # compiled and tested for v4, v5e, v5p and v6e (tests/test_tpu_aot.py).
  unsupported_kinds=(r"^tpu v2", r"^tpu v3"),
)

__all__ = ["IMPLEMENTATION", "TPUBlockSizes", "kernel_vmem_bytes", "resolve"]
