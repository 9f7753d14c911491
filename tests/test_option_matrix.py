"""Loss, lse and gradients of every implementation against the float64 reference, exact mode.

CI runs a pairwise-covering set of option combinations (every value of every option, and every
pair of values of any two options, appears at least once) for every implementation; the full
cross product runs with ``--runslow``. The matrix itself is in ``tests/testing.py``.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
from testing import (
  FULL_CROSS_PRODUCT,
  OPTION_SPACE,
  PAIRWISE,
  SINGLE_OPTION,
  case_id,
  check_case,
)

IMPLS = ("xla", "reference")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", SINGLE_OPTION, ids=[case_id(c) for c in SINGLE_OPTION])
def test_each_option_alone(impl, case):
  check_case(impl, case, seed=zlib.crc32(case_id(case).encode()) + 1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", PAIRWISE, ids=[case_id(c) for c in PAIRWISE])
def test_pairwise_options(impl, case):
  check_case(impl, case, seed=zlib.crc32(case_id(case).encode()))


def test_pairwise_cases_cover_every_pair():
  names = list(OPTION_SPACE)
  for p, q in itertools.combinations(names, 2):
    seen = {(case[p], case[q]) for case in PAIRWISE}
    assert len(seen) == len(OPTION_SPACE[p]) * len(OPTION_SPACE[q]), (p, q)


def pytest_generate_tests(metafunc):
  """The full cross product (about 10**5 cases) is generated only with --runslow: collecting
  it costs seconds in every run (and in every xdist worker) that would deselect it anyway."""
  if metafunc.function is test_full_cross_product:
    cases = FULL_CROSS_PRODUCT if metafunc.config.getoption("--runslow") else []
    metafunc.parametrize("case", cases, ids=[case_id(c) for c in cases])


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_full_cross_product(impl, case):
  check_case(impl, case, seed=zlib.crc32(case_id(case).encode()))
