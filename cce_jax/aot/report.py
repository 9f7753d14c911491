"""What a compiled program reports about itself, the same way for every backend.

:func:`memory_report` reads ``compiled.memory_analysis()``; backends that have cost numbers
(TPU: ``compiled.cost_analysis()``; GPU deviceless: XLA's generic cost model over the optimized
HLO) fill the cost fields of :class:`CompileReport` themselves.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """Per-device numbers of one compiled program (bytes; None where the compiler gives none).

  Attributes:
    argument_bytes, output_bytes, alias_bytes, temp_bytes: from ``memory_analysis()``;
      ``alias_bytes`` are outputs that reuse (donated) argument buffers.
    flops: floating-point operations of the program (cost analysis).
    bytes_accessed: bytes read and written in device memory (cost analysis).
    estimated_seconds: the compiler's own time estimate (XLA:TPU's ``optimal_seconds``), None
      where the backend gives none.
  """

  argument_bytes: int | None = None
  output_bytes: int | None = None
  alias_bytes: int | None = None
  temp_bytes: int | None = None
  flops: float | None = None
  bytes_accessed: float | None = None
  estimated_seconds: float | None = None

  @property
  def peak_bytes(self) -> int | None:
    """Arguments + outputs - aliased buffers + temporaries: the program's footprint."""
    if None in (self.argument_bytes, self.output_bytes, self.alias_bytes, self.temp_bytes):
      return None
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def memory_report(compiled: Any) -> CompileReport:
  """A :class:`CompileReport` with the memory fields of ``compiled.memory_analysis()``.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``).
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return CompileReport()
  return CompileReport(
    argument_bytes=int(stats.argument_size_in_bytes),
    output_bytes=int(stats.output_size_in_bytes),
    alias_bytes=int(stats.alias_size_in_bytes),
    temp_bytes=int(stats.temp_size_in_bytes),
  )
