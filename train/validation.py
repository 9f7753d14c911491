"""The allowed range of every numeric config field, as a table, and the check that applies it.

Each config section declares ``{field: Range(...)}``; :func:`check_ranges` raises one
``ValueError`` subclass (the caller's, :class:`train.config.ConfigError`) naming the dotted
key, the allowed range and the value. Floats must also be finite (``.inf`` and ``.nan`` are
rejected everywhere), and ``nullable`` fields may be ``None``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Range:
  """An interval of allowed values: ``low``/``high`` (None: unbounded), open or closed ends."""

  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  # None ("null" in YAML) is allowed too.
  nullable: bool = False

  def contains(self, value: float) -> bool:
    """Whether a finite ``value`` lies in the interval."""
    if self.low is not None and (value <= self.low if self.low_open else value < self.low):
      return False
    return self.high is None or (value < self.high if self.high_open else value <= self.high)

  def describe(self) -> str:
    """The range in words: ``>= 1``, ``> 0``, ``in [0, 1)``; ``or null`` when nullable."""
    if self.low is not None and self.high is not None:
      text = (
        f"in {'(' if self.low_open else '['}{_number(self.low)}, "
        f"{_number(self.high)}{')' if self.high_open else ']'}"
      )
    elif self.low is not None:
      text = f"{'>' if self.low_open else '>='} {_number(self.low)}"
    elif self.high is not None:
      text = f"{'<' if self.high_open else '<='} {_number(self.high)}"
    else:
      text = "finite"
    return text + (" or null" if self.nullable else "")


def _number(bound: float) -> str:
  return str(int(bound)) if float(bound).is_integer() else str(bound)


def at_least(low: float, *, nullable: bool = False) -> Range:
  """``>= low``."""
  return Range(low=low, nullable=nullable)


def positive(*, nullable: bool = False) -> Range:
  """``> 0`` (and finite)."""
  return Range(low=0, low_open=True, nullable=nullable)


def fraction(*, high_open: bool = True) -> Range:
  """``[0, 1)`` (or ``[0, 1]``)."""
  return Range(low=0, high=1, high_open=high_open)


def check_ranges(
  obj: Any, ranges: Mapping[str, Range], prefix: str, error: type[Exception]
) -> None:
  """Raises ``error`` for the first field of ``obj`` outside its range in ``ranges``.

  Args:
    obj: a config dataclass instance.
    ranges: field name -> its allowed range.
    prefix: the section's dotted prefix (``"optim."``, or ``""`` at the top level).
    error: the exception type raised (a ``ValueError`` subclass).

  Raises:
    error: "<prefix><field> must be <range>, got <value>" for a value outside its range,
      non-finite, or None where not nullable.
  """
  for name, allowed in ranges.items():
    value = getattr(obj, name)
    if value is None and allowed.nullable:
      continue
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
      raise error(f"{prefix}{name} must be a number {allowed.describe()}, got {value!r}")
    if not math.isfinite(value):
      raise error(f"{prefix}{name} must be {allowed.describe()} and finite, got {value!r}")
    if not allowed.contains(value):
      raise error(f"{prefix}{name} must be {allowed.describe()}, got {value!r}")
