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
  def get_default(cls, dtype=None) -> BlockSizes:
    """The default tiles for inputs of ``dtype`` (float32 when None).

    16-bit inputs get 256 x 512 tiles: their filter threshold (2**-12 for bfloat16) lets the
    backward skip whole tiles on trained-model inputs, and smaller tiles are skipped more often
    (measured by ``benchmarks/speed.py``). float32's threshold (2**-28) almost never clears a
    tile, so it gets the large tiles that keep matrix products fastest.

    Example:
      >>> import jax.numpy as jnp
      >>> from cce_jax import BlockSizes
      >>> BlockSizes.get_default(jnp.bfloat16)
      BlockSizes(token_block=256, vocab_block=512)
      >>> BlockSizes.get_default() == BlockSizes(token_block=1024, vocab_block=2048)
      True
    """
    if dtype is not None and np.dtype(dtype).itemsize == 2:
      return cls(token_block=256, vocab_block=512)
    return cls()
