"""Tile sizes of the Pallas TPU kernels, and the VMEM heuristic that picks them.

Every kernel works on a tile of ``token_block x vocab_block`` logits, computed as the sum over
``hidden_block``-wide chunks of the hidden dimension D. What lives in VMEM (per TensorCore) is
the double-buffered input blocks of ``e`` and ``c``, the f32 accumulators, a few f32 logit-sized
temporaries, and for the backward a whole-width block of ``c`` and the f32 gradient accumulator
of that vocabulary block (dC, ``vocab_block x D``), plus one f32 ``token_block x hidden_block``
chunk of dE.
:func:`kernel_vmem_bytes` adds these up per kernel, rounding every buffer up to the (8, 128)
VMEM tiling (16 sublanes for 16-bit types). The heuristic (:func:`resolve`) keeps the largest
tiles whose every kernel stays within ``VMEM_HEADROOM`` of the budget, the rest left to Mosaic's
own scratch and to temporaries the count misses.

TPU tiling rules: the last two dimensions of every block must be multiples of (8, 128) or the
whole array dimension; so every block size here is a multiple of 128 (which also covers
bfloat16's 16-row packing), and a block larger than the problem is clamped to the whole
dimension. Sizes that are not a multiple of their block leave a ragged last block that the
kernels mask; nothing is padded by copying.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from cce_jax.filtering import cdiv

LANES = 128
# The default VMEM budget: the default scoped VMEM limit of TPU v4 and v5e (v5p and v6e: 32 MiB).
DEFAULT_VMEM_BUDGET = 16 * 1024 * 1024
# TPU v5e and v6e have 128 MiB of VMEM per core. There the default plans for 96 MiB with
# 4096-class vocabulary blocks in the backward (its dE traffic, 8 N D bytes per vocabulary
# block, falls with them) and up to 4 x 512 tokens in the forward (its reads of c fall with
# them): by the TPU compiler's own estimates at the paper's shape (bf16, loss+grad,
# docs/tpu_backend.md) that brings the HBM bytes under the materialized baseline's; a compiler
# estimate, not yet a measurement.
LARGE_VMEM_KINDS = ("tpu v5 lite", "tpu v5e", "tpu v6 lite", "tpu v6e")
LARGE_VMEM_BUDGET = 96 * 1024 * 1024
LARGE_VMEM_VOCAB_BLOCK = 2048
LARGE_VMEM_GROUPED_VOCAB_BLOCK = 4096  # with c read by groups: no dC output blocks in VMEM
LARGE_FORWARD_TOKEN_FACTOR = 4
# Classes per group of the vocabulary sort: 1 (class by class, on a sorted copy of c) or
# whole groups of 16 rows (one bf16 HBM tile) up to a lane width, read in place by DMA.
VOCAB_SORT_GROUPS = (1, 16, 32, 64, 128)
# The fraction of the budget the counted buffers may fill.
VMEM_HEADROOM = 0.75
# The hidden chunk is not cut below this width while a smaller tile could keep it wider.
_MIN_PREFERRED_HIDDEN_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class TPUBlockSizes:
  """Tile sizes of ``impl="pallas_tpu"``; None leaves a size to the VMEM heuristic.

  Attributes:
    token_block: tokens per tile (rows of ``e``), a multiple of 128; None: 512 for 16-bit
      inputs, 256 for float32, halved while the kernels do not fit the budget.
    vocab_block: classes per tile (rows of ``c``), a multiple of 128; None: 512, halved while
      the kernels do not fit. It is also the granularity of the vocabulary sort's skipped
      tiles and of the forward's per-block logit maxima.
    hidden_block: width of the chunks of D that the logits are accumulated over, a multiple of
      128; None: the whole of D when it fits the budget, else the widest even split that does.
    vmem_budget_bytes: the VMEM the heuristic plans for, passed to Mosaic as
      ``vmem_limit_bytes``; the default fits the default scoped limit of every generation.
      Raising it (up to the chip's VMEM: 128 MiB on v5e/v6e) allows larger tiles.
    vocab_sort_group: classes per group of the vocabulary sort (when it is on): one of
      ``VOCAB_SORT_GROUPS``. A group of 16 or more consecutive classes is read from ``c`` by
      DMA in the sorted order (no copy of ``c``; the default, 16); 1 sorts class by class on a
      temporary sorted copy of ``c`` (more tiles skipped, one (V, D) copy and three gathers
      more: ``docs/tpu_backend.md``).

  Raises:
    TypeError: a size that is not an int (or None).
    ValueError: a block that is not a positive multiple of 128, a budget below 1 MiB, or a
      ``vocab_sort_group`` not in ``VOCAB_SORT_GROUPS``.
  """

  token_block: int | None = None
  vocab_block: int | None = None
  hidden_block: int | None = None
  vmem_budget_bytes: int = DEFAULT_VMEM_BUDGET
  vocab_sort_group: int = 16

  def __post_init__(self):
    required = ("vmem_budget_bytes", "vocab_sort_group")  # the fields None does not leave open
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is None and field.name not in required:
        continue
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
          f"`TPUBlockSizes.{field.name}` must be an int"
          f"{'' if field.name in required else ' or None'}, got "
          f"{type(value).__name__} ({value!r})."
        )
      value = int(value)
      if field.name == "vocab_sort_group":
        if value not in VOCAB_SORT_GROUPS:
          raise ValueError(
            f"`TPUBlockSizes.vocab_sort_group` must be one of {VOCAB_SORT_GROUPS} (1: sort "
            f"class by class on a copy of c; else whole (16, 128) tiles of rows), got {value}."
          )
      elif field.name == "vmem_budget_bytes":
        if value < 1024 * 1024:
          raise ValueError(
            f"`TPUBlockSizes.vmem_budget_bytes` must be at least 1 MiB, got {value}."
          )
      elif value <= 0 or value % LANES:
        raise ValueError(
          f"`TPUBlockSizes.{field.name}` must be a positive multiple of {LANES} (TPU tiles "
          f"are (8, 128) and 16-bit rows pack in pairs), got {value}."
        )
      object.__setattr__(self, field.name, value)

  @classmethod
  def get_default(cls, dtype=None, device_kind: str | None = None) -> TPUBlockSizes:
    """The default tiles for the TPU being compiled for.

    ``device_kind`` (default: that of the compile target, :func:`cce_jax.tuned.device_kind`:
    the mesh in context's devices, else JAX's default backend's) names the chip. On v5e and
    v6e (128 MiB of VMEM) the budget is ``LARGE_VMEM_BUDGET`` (with which :func:`resolve`
    starts from ``LARGE_VMEM_VOCAB_BLOCK`` classes per vocabulary block); elsewhere the default
    budget. Every tile size is left to the heuristic. ``dtype`` is not needed: the heuristic
    runs at call time, when the shapes are known.
    """
    del dtype
    if device_kind is None:
      from cce_jax import tuned

      device_kind = tuned.device_kind(None)
    if device_kind is not None and device_kind.lower().startswith(LARGE_VMEM_KINDS):
      return cls(vmem_budget_bytes=LARGE_VMEM_BUDGET)
    return cls()


class Tiles(NamedTuple):
  """The tile sizes one call runs with (:func:`resolve`), clamped to the problem."""

  token_block: int  # bn of the backward: N rounded up to 16 rows when N <= the requested block
  vocab_block: int  # bv
  hidden_block: int  # bd of the backward kernel
  num_token_blocks: int
  num_vocab_blocks: int
  num_hidden_blocks: int  # nk
  vmem_limit_bytes: int
  forward_hidden_block: int  # bd of the forward kernel (>= hidden_block: it needs less VMEM)
  num_forward_hidden_blocks: int
  # bn of the forward (>= token_block: the forward holds no whole-width block); None: bn.
  forward_token_block: int | None = None
  num_forward_token_blocks: int | None = None
  # bv of the forward, vocab_block / 2**s (its block maxima are combined into the backward's
  # blocks: a smaller vocabulary block leaves VMEM for more tokens); None: bv.
  forward_vocab_block: int | None = None
  num_forward_vocab_blocks: int | None = None

  def for_forward(self) -> Tiles:
    """These tiles with the forward's token block, vocabulary block and hidden chunk as
    ``token_block``, ``vocab_block`` and ``hidden_block``."""
    tiles = self._replace(
      hidden_block=self.forward_hidden_block, num_hidden_blocks=self.num_forward_hidden_blocks
    )
    if self.forward_token_block is not None:
      tiles = tiles._replace(
        token_block=self.forward_token_block, num_token_blocks=self.num_forward_token_blocks
      )
    if self.forward_vocab_block is not None:
      tiles = tiles._replace(
        vocab_block=self.forward_vocab_block, num_vocab_blocks=self.num_forward_vocab_blocks
      )
    return tiles


def _tile_bytes(rows: int, cols: int, itemsize: int) -> int:
  """VMEM bytes of a (rows, cols) buffer, padded to the (8 * packing, 128) tiling."""
  sublanes = 8 * max(1, 4 // itemsize)
  return cdiv(rows, sublanes) * sublanes * cdiv(cols, LANES) * LANES * itemsize


def kernel_vmem_bytes(
  token_block: int,
  vocab_block: int,
  hidden_block: int,
  hidden: int,
  itemsize: int,
  grouped: bool = False,
) -> dict[str, int]:
  """Estimated VMEM bytes of each kernel at these tiles (the heuristic's model).

  Counts the double-buffered input and output blocks, the scratch accumulators, and four
  f32 ``token_block x vocab_block`` temporaries (logits, exponentials, gradient, masks). The
  classifier block is counted as (vocab_block, hidden_block) in either layout; the backward's
  blocks of ``e`` and ``c`` as (token_block or vocab_block, D rounded up to whole chunks).

  Args:
    token_block, vocab_block, hidden_block: bn, bv, bd (already clamped to the problem).
    hidden: D.
    itemsize: bytes per element of ``e`` and ``c`` (2 or 4).
    grouped: the kernels read ``c`` by groups of rows (``kernels.GROUP_ROWS``, the grouped
      vocabulary sort): the forward holds two whole-width slots of ``c`` instead of two
      chunks, and the backward writes dC by DMA from its ``c`` buffer (no dC output blocks).

  Returns:
    ``{"forward": bytes, "backward": bytes}``.
  """
  bn, bv, bd = token_block, vocab_block, hidden_block
  nk = cdiv(hidden, bd)
  hidden_padded = nk * bd
  f32 = 4
  c_block = _tile_bytes(bv, hidden_padded if grouped else bd, itemsize)
  inputs = 2 * (_tile_bytes(bn, bd, itemsize) + c_block)
  inputs += 2 * _tile_bytes(1, bv, f32)  # bias
  logit_temps = 4 * _tile_bytes(bn, bv, f32)
  chunked = nk > 1
  logit_acc = _tile_bytes(bn, bv, f32) if chunked else 0
  grad_scratch = _tile_bytes(bn, bv, itemsize) if chunked else 0
  token_inputs = 2 * (_tile_bytes(bn, 4, f32) + _tile_bytes(bn, 1, f32))  # stats, labels
  forward = (
    inputs
    + logit_temps
    + logit_acc
    + 2 * 2 * _tile_bytes(bn, LANES, f32)  # lse/logit-sum and block-maxima outputs
    + 3 * _tile_bytes(bn, 1, f32)  # running max, sum, logit sum
  )
  backward = (  # kernels.grads: blocks of e and c at full width
    2 * _tile_bytes(bn, hidden_padded, itemsize)
    + _tile_bytes(bv, hidden_padded, itemsize)  # one buffer: it changes per vocabulary block
    + 2 * _tile_bytes(1, bv, f32)  # bias
    + token_inputs
    + logit_temps
    + logit_acc
    + grad_scratch
    + (0 if grouped else 2 * _tile_bytes(bv, bd, itemsize))
    + 2 * _tile_bytes(1, bv, f32)  # dC, dbias outputs
    + 2 * _tile_bytes(1, bd, f32)  # class offset
    + _tile_bytes(bv, hidden_padded, f32)
    + _tile_bytes(1, bv, f32)  # dC, dbias accumulators
    + _tile_bytes(bn, bd, f32)  # the tile's dE chunk, read and written by DMA
  )
  return {"forward": forward, "backward": backward}


def _hidden_blocks(hidden: int, requested: int | None):
  """Candidate hidden chunks, widest first: D itself, then even splits rounded up to 128."""
  if requested is not None:
    yield min(requested, hidden)
    return
  yield hidden
  widest = hidden
  for parts in range(2, cdiv(hidden, LANES) + 1):
    block = cdiv(cdiv(hidden, parts), LANES) * LANES
    if block < widest:
      widest = block
      yield block


def _clamp(requested: int, size: int) -> int:
  return size if size <= requested else requested


# The backward's token block is a whole number of these rows even when clamped to a smaller N:
# its dE rows move by DMA into an f32 HBM buffer, whose offsets Mosaic must prove aligned to
# the (8, 128) tile (16 also covers the packed 16-bit tiles of e's blocks).
TOKEN_ROW_MULTIPLE = 16


def _clamp_backward_tokens(requested: int, num_tokens: int) -> int:
  """``requested``, or ``num_tokens`` rounded up to ``TOKEN_ROW_MULTIPLE`` when that is less
  (the rows past N are masked in the kernel and land in dE's padding)."""
  return min(requested, cdiv(num_tokens, TOKEN_ROW_MULTIPLE) * TOKEN_ROW_MULTIPLE)


def resolve(
  sizes: TPUBlockSizes,
  num_tokens: int,
  hidden: int,
  num_classes: int,
  dtype,
  grouped: bool = False,
) -> Tiles:
  """The tiles of one call: explicit sizes kept, None sizes chosen by the VMEM heuristic.

  Heuristic: start from (token, vocab) = (512, 512) for 16-bit inputs and (256, 512) for
  float32 (tiles whose matrix products keep a TPU's matrix unit busier than its HBM), with a
  vocabulary block of ``LARGE_VMEM_VOCAB_BLOCK`` from a budget of ``LARGE_VMEM_BUDGET`` up, the
  vocabulary block clamped to V (the token block is clamped to N only after the choice, which
  so does not depend on N). For each candidate, take the widest hidden chunk (D itself first, then D
  split evenly into 2, 3, ... chunks of a multiple of 128) at least 256 wide with which every
  kernel's :func:`kernel_vmem_bytes` is within ``VMEM_HEADROOM`` of the budget; if none,
  halve a free (None) tile size, the token block first, down to 128, and try again; finally
  accept hidden chunks down to 128. The token block goes first because the backward's HBM
  traffic (``kernels.grads``: dE is read and written once per vocabulary block) falls with the
  vocabulary block alone. The forward then takes the largest token block, from the starting
  one down, with which it fits with its hidden chunk (its traffic, ``c`` read once per token
  block, falls with the token block): ``Tiles.forward_token_block``.

  From ``LARGE_VMEM_BUDGET`` up the vocabulary block starts at ``LARGE_VMEM_VOCAB_BLOCK``
  (``LARGE_VMEM_GROUPED_VOCAB_BLOCK`` when ``grouped``), and
  the forward may take up to ``LARGE_FORWARD_TOKEN_FACTOR`` times the starting token block with
  a vocabulary block of the backward's halved up to twice (``Tiles.forward_vocab_block``; the
  most tokens first, then the widest vocabulary block).

  ``grouped``: the kernels will read ``c`` by groups of rows (``kernel_vmem_bytes``'s
  ``grouped``; the backward's count only where its hidden chunk lets it:
  ``kernels.grouped_reads_supported``).

  Raises:
    ValueError: the explicit sizes, or even the smallest free ones, do not fit the budget
      (the message names the sizes and the estimate).
  """
  itemsize = np.dtype(dtype).itemsize
  budget = int(sizes.vmem_budget_bytes * VMEM_HEADROOM)
  large = sizes.vmem_budget_bytes >= LARGE_VMEM_BUDGET
  token_block = start_token_block = sizes.token_block or (512 if itemsize == 2 else 256)
  large_vocab_block = LARGE_VMEM_GROUPED_VOCAB_BLOCK if grouped else LARGE_VMEM_VOCAB_BLOCK
  vocab_block = sizes.vocab_block or (large_vocab_block if large else 512)

  def fits(bn, bv, bd, kernels=("forward", "backward")):
    need = kernel_vmem_bytes(bn, bv, bd, hidden, itemsize, grouped)
    if grouped and bd < hidden and hidden % LANES:  # the backward copies c through its blocks
      need["backward"] = kernel_vmem_bytes(bn, bv, bd, hidden, itemsize)["backward"]
    return max(need[k] for k in kernels) <= budget

  def first_fit(bn, bv, min_hidden_block):
    for bd in _hidden_blocks(hidden, sizes.hidden_block):
      if (bd >= min_hidden_block or bd == hidden or sizes.hidden_block) and fits(bn, bv, bd):
        return bd
    return None

  # The choice is made at the requested token block, not the one clamped to N, so that the
  # vocabulary block (which the forward's block maxima and the backward's skip table must
  # share) does not depend on N: a vmapped forward folds the examples into one call.
  candidates = []
  while True:
    candidates.append((token_block, _clamp(vocab_block, num_classes)))
    free = [
      name
      for name, value, fixed in (
        ("token", token_block, sizes.token_block),
        ("vocab", vocab_block, sizes.vocab_block),
      )
      if fixed is None and value > LANES
    ]
    if not free:
      break
    if "token" in free:
      token_block //= 2
    else:
      vocab_block //= 2
  for min_hidden_block in (_MIN_PREFERRED_HIDDEN_BLOCK, LANES):
    for bn, bv in candidates:
      bd = first_fit(bn, bv, min_hidden_block)
      if bd is not None:
        # The forward holds no whole-width block: it may take a wider hidden chunk and more
        # tokens.
        forward_bn, forward_bd = (
          bn,
          next(
            b
            for b in _hidden_blocks(hidden, sizes.hidden_block)
            if b <= bd or fits(bn, bv, b, ("forward",))
          ),
        )
        forward_bv = bv
        if sizes.token_block is None:
          first = start_token_block * (LARGE_FORWARD_TOKEN_FACTOR if large else 1)
          forward_vocab_blocks = [bv]
          if large:  # halved, while a whole number of lanes
            forward_vocab_blocks += [bv >> s for s in (1, 2) if (bv >> s) % LANES == 0]
          wider = (
            (b, fv, d)
            for b in (first >> s for s in range(10))
            if b > bn
            for fv in forward_vocab_blocks
            for d in _hidden_blocks(hidden, sizes.hidden_block)
            if d >= forward_bd and fits(b, fv, d, ("forward",))
          )
          forward_bn, forward_bv, forward_bd = next(wider, (forward_bn, bv, forward_bd))
        bn, forward_bn = _clamp_backward_tokens(bn, num_tokens), _clamp(forward_bn, num_tokens)
        return Tiles(
          bn,
          bv,
          bd,
          cdiv(num_tokens, bn),
          cdiv(num_classes, bv),
          cdiv(hidden, bd),
          sizes.vmem_budget_bytes,
          forward_bd,
          cdiv(hidden, forward_bd),
          forward_bn,
          cdiv(num_tokens, forward_bn),
          forward_bv,
          cdiv(num_classes, forward_bv),
        )
  bn, bv = candidates[-1]
  bd = min(sizes.hidden_block or LANES, hidden)
  need = kernel_vmem_bytes(bn, bv, bd, hidden, itemsize)
  raise ValueError(
    f"`block_sizes`={sizes} does not fit its VMEM budget at N={num_tokens}, D={hidden}, "
    f"V={num_classes}, {np.dtype(dtype).name}: even token_block={bn}, vocab_block={bv}, "
    f"hidden_block={bd} need an estimated {max(need.values())} bytes ({need}) > "
    f"{VMEM_HEADROOM} x vmem_budget_bytes = {budget}. Use smaller blocks or a larger "
    "`vmem_budget_bytes`."
  )
