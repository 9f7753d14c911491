"""Run files live on a local path or behind a URI (``gs://bucket/run``, through ``etils.epath``)."""

from __future__ import annotations

import os


def is_uri(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a URI such as ``gs://bucket/run`` rather than a local path."""
  return "://" in os.fspath(path)
