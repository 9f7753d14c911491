"""The static (hashable) description of one loss computation, shared by every implementation."""

from __future__ import annotations

import dataclasses
from typing import Literal, Protocol

from cce_jax.block_sizes import BlockSizes

ClassifierLayout = Literal["vd", "dv"]


class TileSizes(Protocol):
  """What every implementation's block-size dataclass is: frozen (so hashable, a static
  argument), with at least these two sizes (None: left to the implementation's heuristic)."""

  @property
  def token_block(self) -> int | None: ...

  @property
  def vocab_block(self) -> int | None: ...


@dataclasses.dataclass(frozen=True)
class LossOptions:
  """Everything about a loss call that is not an array; validated by ``cce_jax.checks``.

  Attributes:
    ignore_index: label value of tokens that carry no loss.
    softcap: logits are ``softcap * tanh(x / softcap)``; None for raw logits.
    z_loss: weight ``k`` of the ``k * lse**2`` term.
    label_smoothing: weight ``a`` of the uniform target.
    filter_eps: skip threshold of the backward's softmax-gradient tiles; None for exact.
    filter_e_grad: whether skipping applies to the gradient of ``e``.
    filter_c_grad: whether skipping applies to the gradient of ``c``.
    sort_vocab: visit the vocabulary by descending average logit in the backward.
    classifier_layout: "vd" for ``c`` of shape (V, D), "dv" for (D, V).
    block_sizes: the tile sizes, as the implementation resolved them
      (``cce_jax.tiled.Implementation.resolve_block_sizes``; :class:`BlockSizes` for "xla"
      and "reference").
    interpret: run Pallas kernels in interpret mode; always False for the other
      implementations (``checks.build_options`` drops it for them).
    vocab_axis: the mesh axis (or axes) over which ``c`` is split along the vocabulary, when
      called inside ``shard_map``; None when this device holds the whole vocabulary.
  """

  ignore_index: int = -100
  softcap: float | None = None
  z_loss: float = 0.0
  label_smoothing: float = 0.0
  filter_eps: float | None = None
  filter_e_grad: bool = True
  filter_c_grad: bool = True
  sort_vocab: bool = True
  classifier_layout: ClassifierLayout = "vd"
  block_sizes: TileSizes = dataclasses.field(default_factory=BlockSizes)
  interpret: bool = False
  vocab_axis: str | tuple[str, ...] | None = None

  @property
  def vocab_dim(self) -> int:
    """The axis of ``c`` that runs over the vocabulary."""
    return 0 if self.classifier_layout == "vd" else 1

  @property
  def filters_anything(self) -> bool:
    """Whether the backward may skip any tile (see docs/math.md)."""
    if self.filter_eps is None or not (self.filter_e_grad or self.filter_c_grad):
      return False
    # With softcap the uniform label-smoothing term is scaled by every entry's softcap
    # derivative, so it cannot be added outside the tiles and no tile may be skipped.
    return not (self.softcap is not None and self.label_smoothing > 0.0)
