"""Tile sizes of the chunked implementations.

The chunked "xla" implementation walks the (token, vocabulary) plane in tiles of
``token_block x vocab_block`` logits; only a handful of such f32 tiles are ever alive, so they
bound the temporary memory together with the (N, D) f32 gradient accumulator of ``e``. A block
larger than the problem is clamped to it, and sizes that are not a multiple of a block are
handled by an overlapping, masked last block, so no block size is ever needed for correctness.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes for the chunked implementations.

  Attributes:
    token_block: tokens per tile (rows of ``e``).
    vocab_block: classes per tile (rows of ``c``).

  Raises:
    TypeError: a size that is not an int.
    ValueError: a size that is not positive.

  Example:
    >>> from cce_jax import BlockSizes
    >>> BlockSizes(token_block=128, vocab_block=0)
    Traceback (most recent call last):
    ...
    ValueError: `BlockSizes.vocab_block` must be positive, got 0.
  """

  token_block: int = 1024
  vocab_block: int = 2048

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
          f"`BlockSizes.{field.name}` must be an int, got {type(value).__name__} ({value!r})."
        )
      if value <= 0:
        raise ValueError(f"`BlockSizes.{field.name}` must be positive, got {value}.")
      object.__setattr__(self, field.name, int(value))

  @classmethod
  def get_default(cls, dtype=None, backend: str | None = None) -> BlockSizes:
    """The default tiles for inputs of ``dtype`` (float32 when None) on ``backend`` (JAX's
    default backend when None; "cuda" and "rocm" count as "gpu").

    First the tiles ``benchmarks/accelerator.py --apply`` measured fastest on this device kind
    and dtype (``cce_jax/tuned.json``, shipped empty), else:

    * CPU (measured by ``benchmarks/speed.py``): 256 x 512 for 16-bit inputs, whose filter
      threshold (2**-12 for bfloat16) lets the backward skip whole tiles on trained-model
      inputs, more often for small tiles; 1024 x 2048 for float32, whose threshold (2**-28)
      almost never clears a tile, so the large tiles that keep matrix products fastest.
    * GPU and TPU (modelled, ``docs/tiling_model.md``): each tile is one while-loop iteration
      with a fixed cost, tens of microseconds on a GPU, so fewer, larger tiles win although
      fewer of them are skipped; the model picks them per backend and dtype from the skipped
      fractions measured by ``benchmarks/tiling_model.py``.

    Example:
      >>> import jax.numpy as jnp
      >>> from cce_jax import BlockSizes
      >>> BlockSizes.get_default(jnp.bfloat16, backend="cpu")
      BlockSizes(token_block=256, vocab_block=512)
      >>> BlockSizes.get_default(backend="cpu") == BlockSizes(token_block=1024, vocab_block=2048)
      True
    """
    # Imported here: cce_jax.tuned imports jax, which this module does not otherwise need.
    from cce_jax import tuned

    entry = tuned.lookup(dtype, backend)
    if entry is not None:
      return cls(**entry["xla"])
    backend = _BACKEND_ALIASES.get(backend, backend) if backend else _default_backend()
    bits = 16 if dtype is not None and np.dtype(dtype).itemsize == 2 else 32
    token_block, vocab_block = _MODELLED.get(backend, _MODELLED["cpu"])[bits]
    return cls(token_block=token_block, vocab_block=vocab_block)


def _default_backend() -> str:
  """The platform being compiled for (:func:`cce_jax.target.platform`: JAX's default backend,
  or the mesh's in context), "gpu" for CUDA and ROCm."""
  from cce_jax import target  # imports jax, which this module does not otherwise need

  backend = target.platform()
  return _BACKEND_ALIASES.get(backend, backend)


_BACKEND_ALIASES = {"cuda": "gpu", "rocm": "gpu"}

# (token_block, vocab_block) per backend and input bits: the CPU's as measured, the GPU's and
# TPU's as picked by the model of docs/tiling_model.md (benchmarks/tiling_model.py).
_MODELLED = {
  "cpu": {16: (256, 512), 32: (1024, 2048)},
  "gpu": {16: (1024, 8192), 32: (1024, 8192)},
  "tpu": {16: (1024, 2048), 32: (1024, 8192)},
}
