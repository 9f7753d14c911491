"""Run files live on a local path or behind a URI (``gs://bucket/run``, through ``etils.epath``)."""

from __future__ import annotations

import os

from etils import epath

from train.config import ConfigError


def is_uri(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a URI such as ``gs://bucket/run`` rather than a local path."""
  return "://" in os.fspath(path)


def workdir_path(workdir: str) -> epath.Path:
  """``workdir`` as a path: a local one as given, a URI (``gs://bucket/run``) kept intact.

  Raises:
    ConfigError: a URI scheme ``etils.epath`` does not know (it knows gs://, s3://, az://,
      hf://).
  """
  try:
    return epath.Path(workdir)
  except (KeyError, NotImplementedError) as error:
    raise ConfigError(
      f"workdir={workdir!r}: unsupported URI scheme; use a local path or gs://bucket/path"
    ) from error
