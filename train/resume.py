"""Resuming with another config: which changes the checkpoints survive, which they do not.

``config.yaml`` in the workdir is the config of the run that wrote the checkpoints. A resumed
run compares its own config with it, key by key (dotted keys):

* a change that makes the checkpoints unusable (the parameters' shapes or tree: the model's
  sizes, vocabulary, tied/untied head; the optimizer state's tree: clipping on/off) stops the
  run with a :class:`~train.config.ConfigError` naming every such key with both values;
* any other change (steps, learning rate, batch size, seq_len, the data source, ...) is
  allowed and listed in one warning line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from etils import epath

from train import config as config_lib

# Keys whose change gives parameters (or optimizer state) of another shape or tree.
INCOMPATIBLE_KEYS = (
  "model.vocab_size",
  "model.d_model",
  "model.num_layers",
  "model.num_heads",
  "model.num_kv_heads",
  "model.head_dim",
  "model.mlp_dim",
  "model.tie_embeddings",
)
# Keys that say nothing about the run itself.
IGNORED_KEYS = ("workdir", "force_unlock")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"model": {"d_model": 8}}`` -> ``{"model.d_model": 8}`` (lists kept as values)."""
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and not (prefix + key).startswith("mesh.rules"):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def read_stored(path: epath.Path) -> dict[str, Any] | None:
  """The flattened config stored at ``path``; None if missing or not a YAML mapping."""
  try:
    tree = yaml.safe_load(path.read_text())
  except (OSError, yaml.YAMLError):
    return None
  return flatten(tree) if isinstance(tree, Mapping) else None


def _show(value: Any) -> str:
  return "null" if value is None else str(value)


def compare(stored: Mapping[str, Any], cfg: config_lib.TrainConfig) -> list[str]:
  """The allowed changes of ``cfg`` against the ``stored`` (flattened) config, as text.

  Raises:
    ConfigError: a change the checkpoints cannot be restored with; the message names each
      key with the checkpoints' value and the new one.
  """
  current = flatten(config_lib.to_dict(cfg))
  incompatible, allowed = [], []
  for key in sorted(set(stored) | set(current)):
    if key in IGNORED_KEYS:
      continue
    old, new = stored.get(key), current.get(key)
    if _normalize(old) == _normalize(new):
      continue
    change = f"{key} {_show(old)} -> {_show(new)}"
    clipping_toggled = key == "optim.clip_norm" and (old is None) != (new is None)
    (incompatible if key in INCOMPATIBLE_KEYS or clipping_toggled else allowed).append(change)
  if incompatible:
    raise config_lib.ConfigError(
      "the workdir's checkpoints were written with another model: "
      + ", ".join(incompatible)
      + " (checkpoints -> now); use the checkpoints' values or "
      "another workdir"
    )
  return allowed


def _normalize(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return [_normalize(v) for v in value]
  if isinstance(value, Mapping):
    return {k: _normalize(v) for k, v in value.items()}
  if isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value
