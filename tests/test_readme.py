"""The README's Quick start holds exactly two bash blocks, and .ci/run runs the second."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _quick_start_blocks() -> list[str]:
  readme = (ROOT / "README.md").read_text()
  section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def test_quick_start_has_two_bash_blocks():
  assert len(_quick_start_blocks()) == 2


def test_ci_runs_the_readme_test_command():
  ci = (ROOT / ".ci" / "run").read_text()
  ci_block = ci.split("# --- begin: README Quick start, second block ---\n", 1)[1]
  ci_block = ci_block.split("# --- end ---", 1)[0]
  assert ci_block.strip() == _quick_start_blocks()[1].strip()
