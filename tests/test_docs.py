"""The documentation: docstring examples run, the public API shows examples, and the repository
is self-contained (nothing points at a folder a clone does not have)."""

from __future__ import annotations

import doctest
import importlib
import io
import pathlib
import pkgutil
import re
import subprocess

import pytest

import cce_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Folders that are not part of the repository's content, when it is not a git checkout (a
# "shared" folder is what a checkout may have beside its files and a clone lacks).
_NOT_CONTENT = {
  ".git",
  ".venv",
  "__pycache__",
  ".pytest_cache",
  ".ruff_cache",
  "build",
  "dist",
  "shared",
}


def _repository_files() -> list[pathlib.Path]:
  """The tracked files (``git ls-files``), or every file outside ``_NOT_CONTENT`` elsewhere."""
  try:
    listed = subprocess.run(
      ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [ROOT / name for name in listed.split("\0") if name]
  except (OSError, subprocess.CalledProcessError):
    return [
      path
      for path in ROOT.rglob("*")
      if path.is_file()
      and not _NOT_CONTENT.intersection(path.relative_to(ROOT).parts)
      and not path.relative_to(ROOT).parts[0].endswith(".egg-info")
    ]


def _text_files() -> dict[str, str]:
  """Path (relative to the root) -> text of every repository file that is text."""
  texts = {}
  for path in _repository_files():
    if not path.is_file():  # tracked but deleted in the working tree
      continue
    data = path.read_bytes()
    if b"\0" not in data:
      texts[path.relative_to(ROOT).as_posix()] = data.decode(errors="replace")
  return texts


def test_no_file_names_a_folder_outside_the_repository():
  # Built, so that this file does not name it.
  outside = "shared" + "/"
  offenders = [
    f"{name}:{number}"
    for name, text in _text_files().items()
    for number, line in enumerate(text.splitlines(), start=1)
    if outside in line
  ]
  assert not offenders, f"these lines name {outside!r}, which a clone lacks: {offenders}"


def test_every_docs_path_named_in_the_repository_exists():
  named = {
    match for text in _text_files().values() for match in re.findall(r"\bdocs/[\w./-]+\.md\b", text)
  }
  assert "docs/math.md" in named
  missing = sorted(name for name in named if not (ROOT / name).is_file())
  assert not missing, f"named but missing: {missing}"


def _cce_jax_modules() -> list[str]:
  return sorted(name for _, name, _ in pkgutil.walk_packages(cce_jax.__path__, "cce_jax."))


@pytest.mark.parametrize("module_name", ["cce_jax", *_cce_jax_modules()])
def test_docstring_examples_run(module_name):
  # What `pytest --doctest-modules cce_jax` runs, in the default suite.
  module = importlib.import_module(module_name)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  report = io.StringIO()
  for test in doctest.DocTestFinder().find(module, module_name):
    runner.run(test, out=report.write)
  assert runner.failures == 0, report.getvalue()


@pytest.mark.parametrize("name", cce_jax.__all__)
def test_public_names_show_an_example(name):
  obj = getattr(cce_jax, name)
  docs = [obj.__doc__ or ""]
  if isinstance(obj, type):  # a class shows it in its own docstring or in a method's
    docs += [member.__doc__ or "" for member in vars(obj).values() if callable(member)]
    docs += [
      member.__func__.__doc__ or ""
      for member in vars(obj).values()
      if isinstance(member, classmethod | staticmethod)
    ]
  assert any(">>>" in doc for doc in docs), f"cce_jax.{name} has no `>>>` example"
