"""Probes for the choice of a GPU backend once Pallas drops its Triton lowering.

One toy kernel per route, each the core of our forward kernel (one block of tokens, an online
log-sum-exp in f32 over vocabulary tiles of ``e @ c.T``), with what can be checked of it on a
machine without a GPU: does it lower for CUDA (``jax.export``), and does some interpret mode
run it against a float64 reference. ``python -m pallas_kernels.probes`` prints the table that
``docs/gpu_backend.md`` quotes.

* :mod:`~pallas_kernels.probes.triton_pallas`: Pallas on its Triton lowering (today's kernels).
* :mod:`~pallas_kernels.probes.mosaic_gpu`: Pallas on Mosaic GPU (Hopper and newer).
* :mod:`~pallas_kernels.probes.jax_triton`: a Triton kernel through the official bindings and
  ``jax_triton`` (needs the ``jax-triton`` package; reported missing without it).
* :mod:`~pallas_kernels.probes.xla`: no kernel, the chunked "xla" implementation.

:mod:`~pallas_kernels.probes.cuda_lowering` gives a CUDA lowering its target GPU on any JAX.
"""
