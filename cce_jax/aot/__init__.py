"""Ahead-of-time compilation for accelerators that are not attached to this host.

JAX can run the real XLA:TPU compiler (with ``libtpu`` installed) and the real XLA:GPU compiler
(with ``jax-cuda12-plugin``, deviceless) on a CPU-only machine, for devices described by a
topology instead of found on the host. This package holds what the benchmarks, the tests and
``python -m train.aot`` share to do that:

* :mod:`cce_jax.aot.report`: what a compiled program says about itself (memory, and the cost
  numbers the compiler or XLA's generic cost model gives), backend-neutral;
* :mod:`cce_jax.aot.tpu`: TPU topologies (v4, v5e, v5p, v6e) on a CPU host;
* :mod:`cce_jax.aot.gpu`: deviceless CUDA GPU targets (A100, H100, H200) on a CPU host.

Nothing here runs a program: the numbers are the compiler's plan and estimates, not
measurements.
"""
