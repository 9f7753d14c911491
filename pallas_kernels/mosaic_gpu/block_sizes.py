"""Tile sizes of ``impl="pallas_mosaic_gpu"``.

The forward kernel runs blocks of 64 tokens (one warpgroup's ``wgmma`` rows) over vocabulary
tiles of ``vocab_block`` classes, accumulating the product over chunks of 64 hidden units (one
128-byte swizzled row of 16-bit values). The backward is, for now, the chunked "xla" backward,
which tiles the (token, vocabulary) plane in ``token_block x vocab_block``: the vocabulary
blocks must be the forward's, whose per-block logit maxima it reads to skip tiles.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Tokens per forward block (rows of one warpgroup's matrix product) and hidden units per
# product chunk (the 128-byte swizzle holds 64 16-bit values).
TOKEN_ROWS = 64
HIDDEN_CHUNK = 64
# wgmma's N: a multiple of 64 here (the swizzled tiles of c), at most 256.
VOCAB_BLOCKS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class MosaicGPUBlockSizes:
  """Tiles of the Mosaic GPU forward and of the backward it pairs with.

  Attributes:
    token_block: tokens per backward tile (the forward always runs blocks of 64 tokens).
    vocab_block: classes per tile, forward and backward: 64, 128 or 256.

  Raises:
    TypeError: a size that is not an int.
    ValueError: ``token_block`` not positive, or ``vocab_block`` not one of 64, 128, 256.
  """

  token_block: int = 256
  vocab_block: int = 128

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
          f"`MosaicGPUBlockSizes.{field.name}` must be an int, got "
          f"{type(value).__name__} ({value!r})."
        )
      object.__setattr__(self, field.name, int(value))
    if self.token_block <= 0:
      raise ValueError(
        f"`MosaicGPUBlockSizes.token_block` must be positive, got {self.token_block}."
      )
    if self.vocab_block not in VOCAB_BLOCKS:
      raise ValueError(
        f"`MosaicGPUBlockSizes.vocab_block` must be one of {VOCAB_BLOCKS} "
        f"(a wgmma tile width), got {self.vocab_block}."
      )

  @classmethod
  def get_default(cls, dtype=None) -> MosaicGPUBlockSizes:
    """The default tiles (the same for float16 and bfloat16, the dtypes the kernel takes)."""
    del dtype
    return cls()
