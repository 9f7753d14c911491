"""Tile sizes of the Pallas GPU (Triton) kernels, their validation and shared-memory budget.

Triton needs every tile dimension to be a power of two, and its matrix product (``tl.dot``)
needs every dimension to be at least 16. Shared memory is the resource a bad tiling exhausts:
the lowering on a CPU machine does not check it (a 1024 x 1024 bf16 tile lowers without
complaint and only fails when Triton compiles it on the GPU), so :class:`GPUBlockSizes`
carries an estimate of what its kernels allocate and checks it against the generation's
per-block limit, at construction for 16-bit inputs and at trace time for the actual dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from cce_jax import filtering

# Shared memory a thread block may use (opt-in maximum), bytes.
SHARED_MEMORY_LIMITS = {
  "a100": 163 * 1024,  # sm_80
  "h100": 227 * 1024,  # sm_90
}
# Streaming multiprocessors: the persistent dC kernel's default number of programs.
STREAMING_MULTIPROCESSORS = {"a100": 108, "h100": 132}
# Triton's matrix product needs M, N, K >= 16.
MIN_BLOCK = 16
_WARPS = (1, 2, 4, 8, 16)


def _is_power_of_two(value: int) -> bool:
  return value > 0 and value & (value - 1) == 0


def detect_generation() -> str:
  """ "h100" for compute capability 9.x and newer, "a100" for 8.x, "h100" without a GPU."""
  try:
    device = jax.devices("gpu")[0]
  except RuntimeError:
    return "h100"
  capability = str(getattr(device, "compute_capability", "9.0"))
  return "a100" if capability.startswith("8") else "h100"


@dataclasses.dataclass(frozen=True)
class GPUBlockSizes:
  """Tiles and launch parameters of the Pallas GPU kernels.

  Attributes:
    token_block: tokens per tile (rows of ``e``); power of two >= 16.
    vocab_block: classes per tile (rows of ``c``); power of two >= 16. Also the granularity of
      gradient filtering: a tile is skipped as a whole.
    hidden_block: the D reduction and the gradient products run in chunks of this many
      hidden units; power of two >= 16.
    vocab_splits: the forward runs ``vocab_splits`` programs per token block, each over a
      contiguous share of the vocabulary blocks, merged afterwards (more parallelism when N is
      small); >= 1, clamped to the number of vocabulary blocks.
    grad_c_vocab_block: classes per dC program with 16-bit inputs, a power of two >= 16
      (clamped to ``vocab_block``): each of those programs accumulates its classes' gradient
      over all tokens in an f32 ``(grad_c_vocab_block, D)`` buffer before writing it once in the
      input dtype. A filtered tile is skipped by the vocabulary block it lies in.
    grad_c_programs: persistent dC programs with 16-bit inputs, >= 1 (one per streaming
      multiprocessor by default); each reuses its own f32 buffer for one class block after
      another, so the f32 scratch is ``grad_c_programs * grad_c_vocab_block * D * 4`` bytes
      whatever V (38.9 MB at D = 2304 with the defaults, against 2.36 GB for an f32 dC at
      V = 256000).
    num_warps: Triton warps per program (1, 2, 4, 8 or 16).
    num_stages: Triton software-pipelining stages of the D loops; >= 1.
    generation: "a100" or "h100": the shared-memory limit the tiles are checked against.

  Raises:
    TypeError: a field of the wrong type.
    ValueError: a size that is not a power of two >= 16, bad launch parameters, an unknown
      generation, or tiles whose estimated shared memory exceeds the generation's limit for
      16-bit inputs (the message names the fields and the estimate).
  """

  token_block: int = 64
  vocab_block: int = 128
  hidden_block: int = 64
  vocab_splits: int = 16
  grad_c_vocab_block: int = 32
  grad_c_programs: int = STREAMING_MULTIPROCESSORS["h100"]
  num_warps: int = 4
  num_stages: int = 3
  generation: str = "h100"

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name == "generation":
        if not isinstance(value, str):
          raise TypeError(f"`GPUBlockSizes.generation` must be a str, got {type(value).__name__}.")
        if value not in SHARED_MEMORY_LIMITS:
          raise ValueError(
            f"`GPUBlockSizes.generation` must be one of {sorted(SHARED_MEMORY_LIMITS)}, "
            f"got {value!r}."
          )
        continue
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(
          f"`GPUBlockSizes.{field.name}` must be an int, got {type(value).__name__} ({value!r})."
        )
      object.__setattr__(self, field.name, int(value))
    for name in ("token_block", "vocab_block", "hidden_block", "grad_c_vocab_block"):
      value = getattr(self, name)
      if not _is_power_of_two(value) or value < MIN_BLOCK:
        raise ValueError(
          f"`GPUBlockSizes.{name}` must be a power of two >= {MIN_BLOCK} (Triton tiles), "
          f"got {value}."
        )
    if self.vocab_splits < 1:
      raise ValueError(f"`GPUBlockSizes.vocab_splits` must be >= 1, got {self.vocab_splits}.")
    if self.grad_c_programs < 1:
      raise ValueError(f"`GPUBlockSizes.grad_c_programs` must be >= 1, got {self.grad_c_programs}.")
    if self.num_warps not in _WARPS:
      raise ValueError(f"`GPUBlockSizes.num_warps` must be one of {_WARPS}, got {self.num_warps}.")
    if self.num_stages < 1:
      raise ValueError(f"`GPUBlockSizes.num_stages` must be >= 1, got {self.num_stages}.")
    self.check_shared_memory(jax.numpy.bfloat16)

  def shared_memory_bytes(self, dtype) -> int:
    """Estimated shared memory of the largest kernel for inputs of ``dtype``, bytes.

    An estimate of what Triton allocates, not its allocator: the D loop of the logits keeps
    ``num_stages`` pipelined chunks of ``e`` and ``c`` (``(token_block + vocab_block) x
    hidden_block`` each); a gradient product keeps the (token_block, vocab_block) softmax
    gradient as one operand and ``num_stages`` chunks of the other; the loops run one after the
    other, so the largest counts; plus one f32 (token_block, vocab_block) tile for layout
    conversions of the logits. The exact figure comes from compiling on the GPU
    (``tests/test_pallas_gpu.py``'s GPU tests print nothing of it; Triton raises
    ``OutOfResources`` when it does not fit).
    """
    in_bytes = np.dtype(dtype).itemsize
    p_bytes = filtering.product_dtype(dtype).itemsize
    bn, bv, bd, stages = self.token_block, self.vocab_block, self.hidden_block, self.num_stages
    logits = stages * (bn + bv) * bd * in_bytes
    grad_operand = bn * bv * p_bytes
    d_e_product = grad_operand + stages * bv * bd * p_bytes
    d_c_product = grad_operand + stages * bn * bd * p_bytes
    conversion = bn * bv * 4
    return max(logits, d_e_product, d_c_product) + conversion

  def check_shared_memory(self, dtype) -> None:
    """Raises ValueError when :meth:`shared_memory_bytes` exceeds the generation's limit."""
    need = self.shared_memory_bytes(dtype)
    limit = SHARED_MEMORY_LIMITS[self.generation]
    if need > limit:
      raise ValueError(
        f"GPUBlockSizes(token_block={self.token_block}, vocab_block={self.vocab_block}, "
        f"hidden_block={self.hidden_block}, num_stages={self.num_stages}) needs about "
        f"{need / 1024:.0f} KiB of shared memory for {np.dtype(dtype).name} inputs, more than "
        f"the {limit // 1024} KiB of generation={self.generation!r}; use smaller blocks or "
        "fewer stages."
      )

  @classmethod
  def get_default(cls, dtype=None, generation: str | None = None) -> GPUBlockSizes:
    """Starting-point tiles for inputs of ``dtype`` (float32 when None) on ``generation``
    (detected from the first GPU when None; "h100" without one).

    Not tuned on hardware yet (``benchmarks/gpu.py`` measures them): 64 x 128 tiles for 16-bit
    inputs, whose filter threshold lets whole tiles be skipped, with D chunks of 64 on H100 and
    32 on A100 (less shared memory); 64 x 64 tiles with D chunks of 32 for float32. The dC
    kernel runs one persistent program per streaming multiprocessor of ``generation``.
    """
    generation = detect_generation() if generation is None else generation
    programs = STREAMING_MULTIPROCESSORS[generation]
    if dtype is not None and np.dtype(dtype).itemsize == 2:
      hidden_block = 64 if generation == "h100" else 32
      return cls(
        token_block=64,
        vocab_block=128,
        hidden_block=hidden_block,
        grad_c_programs=programs,
        generation=generation,
      )
    return cls(
      token_block=64,
      vocab_block=64,
      hidden_block=32,
      grad_c_programs=programs,
      generation=generation,
    )
