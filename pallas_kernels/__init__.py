"""Pallas kernels for Cut Cross-Entropy, one package per backend.

Each package registers a ``cce_jax.tiled.Implementation`` as ``IMPLEMENTATION``, which
``cce_jax.dispatch`` imports on first use (so ``import cce_jax`` never pulls in Pallas):

* ``pallas_kernels.gpu``: ``impl="pallas_gpu"``, CUDA GPUs (Ampere, Hopper) through Pallas'
  Triton lowering; ``interpret=True`` runs the same kernels on a CPU.
* ``pallas_kernels.tpu``: ``impl="pallas_tpu"``, TPUs through Mosaic.

The math they implement is ``cce_jax.loss_math`` and ``cce_jax.filtering``
(``docs/math.md``); an ``impl`` whose package is missing raises NotImplementedError.
"""
