"""Pallas kernels for Cut Cross-Entropy (GPU: Triton lowering; TPU: Mosaic).

Not in this version: ``impl="pallas_gpu"`` and ``impl="pallas_tpu"`` raise NotImplementedError
until the kernels land here. The math they must implement is the one in ``cce_jax.loss_math``.
"""
