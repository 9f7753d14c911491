"""The trainer's configuration: frozen dataclasses, built from YAML plus ``key=value`` overrides.

A config file is a YAML mapping whose keys are the fields of :class:`TrainConfig`; nested
sections (``model``, ``loss``, ``optim``, ``mesh``, ``data``) are mappings of their own
dataclass's fields. Overrides are ``key=value`` strings with dotted keys for nested fields
(``model.num_layers=2``, ``mesh.rules.vocab=tensor``); values are parsed as YAML scalars
(``40``, ``1e-3``, ``null``, ``true``, ``[data, fsdp]``). Every unknown key and every bad
value raises :class:`ConfigError` with a message naming the key and listing the valid keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from cce_jax.checks import IMPLS
from train import data
from train.hardware import HardwareConfig
from train.validation import Range, at_least, check_ranges, fraction, positive

# Where `python -m train` looks when no config file is given.
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = pathlib.Path("configs") / "default.yaml"

# Logical axis -> mesh axes (None: replicated). Parameters use the plain names, activations
# the ``act_`` ones, so that a parameter's "embed" (FSDP-sharded) and an activation's model
# dimension (replicated, its batch being sharded over the same devices) can differ.
DEFAULT_RULES: dict[str, Any] = {
  "vocab": "tensor",
  "embed": "fsdp",
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": None,
  "mlp": "tensor",
  "norm": None,
  "layers": None,
  "act_batch": ["data", "fsdp"],
  "act_seq": None,
  "act_embed": None,
  "act_heads": "tensor",
  "act_kv_heads": "tensor",
  "act_mlp": "tensor",
  "act_vocab": "tensor",
}
MESH_AXES = ("data", "fsdp", "tensor")
LOSS_IMPLS = ("cce", "naive")
DTYPES = ("float32", "bfloat16")
# The `impl` values cce_jax.linear_cross_entropy accepts (loss.cce_impl): cce_jax's own list,
# so that a new implementation is a valid loss.cce_impl without a second edit here.
CCE_IMPLS = IMPLS
# seed is an int32 on the device.
MAX_SEED = 2**31 - 1


class ConfigError(ValueError):
  """A config key that does not exist or a value that is not allowed."""


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama/Gemma-style decoder-only transformer.

  The defaults (here and in every section) are the CPU run of ``configs/default.yaml``, so an
  installed package without that file trains the same model.
  """

  # Classes of the output layer; null: the tokenizer's vocabulary size, rounded up to 128.
  vocab_size: int | None = None
  # Width D of the residual stream.
  d_model: int = 128
  num_layers: int = 2
  # Query heads; num_kv_heads < num_heads is grouped-query attention (must divide it).
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  # Hidden width of the SwiGLU MLP.
  mlp_dim: int = 512
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  # The head reuses the (V, D) embedding table instead of its own (D, V) kernel.
  tie_embeddings: bool = True
  # Multiply token embeddings by sqrt(d_model) (Gemma).
  scale_embeddings: bool = False
  # Final-logit soft-capping s: logits become s * tanh(logits / s) (Gemma 2: 30.0).
  final_softcap: float | None = None
  # Dropout on the residual branches during training (0: none; uses the run's RNG).
  dropout: float = 0.0
  # Activation/compute dtype; parameters and optimizer state stay in param_dtype.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Recompute each layer's activations in the backward (jax.checkpoint per layer).
  remat: bool = False
  # Queries per attention chunk (null: all at once). Chunks are checkpointed, so one chunk's
  # (chunk x T) scores are alive at a time instead of (T x T); must divide seq_len.
  attention_chunk: int | None = None

  def __post_init__(self):
    check_ranges(self, MODEL_RANGES, "model.", ConfigError)
    _require(
      self.num_heads % self.num_kv_heads == 0,
      f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}",
    )
    _require(self.head_dim % 2 == 0, f"model.head_dim must be even (RoPE), got {self.head_dim}")
    _require(self.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
    _require(
      self.param_dtype in DTYPES,
      f"model.param_dtype must be one of {DTYPES}, got {self.param_dtype!r}",
    )


MODEL_RANGES: dict[str, Range] = {
  "vocab_size": at_least(2, nullable=True),
  **{
    name: at_least(1)
    for name in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")
  },
  "rope_theta": positive(),
  "norm_eps": positive(),
  "final_softcap": positive(nullable=True),
  "dropout": fraction(),
  "attention_chunk": at_least(1, nullable=True),
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Options of the loss, passed through to ``cce_jax.linear_cross_entropy``."""

  # `impl` of cce_jax.linear_cross_entropy when loss_impl is "cce".
  cce_impl: str = "auto"
  z_loss: float = 0.0
  label_smoothing: float = 0.0
  # "auto", a float, or null (exact backward).
  filter_eps: float | str | None = "auto"
  # The paper's pretraining recipe: filter dE, never dC (docs/math.md says why).
  filter_e_grad: bool = True
  filter_c_grad: bool = False
  # Compute the loss's gradient in its forward (cce_jax's grad_in_forward): three matrix
  # passes instead of four, for a (token_block, V) f32 buffer and the head's f32 gradients.
  grad_in_forward: bool = False

  def __post_init__(self):
    _require(
      self.cce_impl in CCE_IMPLS, f"loss.cce_impl must be one of {CCE_IMPLS}, got {self.cce_impl!r}"
    )
    _require(
      not self.grad_in_forward or self.cce_impl in ("auto", "xla"),
      f"loss.grad_in_forward=true needs loss.cce_impl 'auto' or 'xla', got {self.cce_impl!r}",
    )
    check_ranges(self, LOSS_RANGES, "loss.", ConfigError)
    _require(
      self.filter_eps is None
      or self.filter_eps == "auto"
      or (
        isinstance(self.filter_eps, float)
        and FILTER_EPS_RANGE.contains(self.filter_eps)
        and math.isfinite(self.filter_eps)
      ),
      f"loss.filter_eps must be 'auto', a float {FILTER_EPS_RANGE.describe()} or null, "
      f"got {self.filter_eps!r}",
    )


LOSS_RANGES: dict[str, Range] = {"z_loss": at_least(0), "label_smoothing": fraction()}
# A softmax-gradient entry is at most 1: a larger threshold would skip every tile.
FILTER_EPS_RANGE = fraction(high_open=False)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup and cosine decay, global-norm clipping."""

  learning_rate: float = 3e-3
  warmup_steps: int = 20
  # The cosine decays to learning_rate * end_lr_ratio at the last step.
  end_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  # Clip the global gradient norm to this (null: no clipping).
  clip_norm: float | None = 1.0

  def __post_init__(self):
    check_ranges(self, OPTIM_RANGES, "optim.", ConfigError)


OPTIM_RANGES: dict[str, Range] = {
  "learning_rate": positive(),
  "warmup_steps": at_least(0),
  "end_lr_ratio": fraction(high_open=False),
  "b1": fraction(),
  "b2": fraction(),
  "eps": at_least(0),
  "weight_decay": at_least(0),
  "clip_norm": positive(nullable=True),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh (data, fsdp, tensor) and the logical-axis rules onto it.

  One axis may be -1: it takes every device the others leave. The mesh's axis types are
  ``Auto`` (see ``train/sharding.py`` for why).
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  # Logical axis name -> mesh axis, list of mesh axes, or null (replicated).
  rules: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))

  def __post_init__(self):
    sizes = (self.data, self.fsdp, self.tensor)
    _require(
      all(s == -1 or s >= 1 for s in sizes) and sizes.count(-1) <= 1,
      f"mesh sizes must be >= 1, with at most one -1; got data={self.data}, "
      f"fsdp={self.fsdp}, tensor={self.tensor}",
    )
    _require(isinstance(self.rules, Mapping), f"mesh.rules must be a mapping, got {self.rules!r}")
    for name, axes in self.rules.items():
      listed = [axes] if axes is None or isinstance(axes, str) else list(axes)
      _require(
        all(a is None or a in MESH_AXES for a in listed),
        f"mesh.rules.{name}={axes!r}: mesh axes are {MESH_AXES} (or null)",
      )
    missing = sorted(set(DEFAULT_RULES) - set(self.rules))
    _require(not missing, f"mesh.rules lacks logical axes {missing}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run. The top-level keys are the ones a user overrides most."""

  # Output directory: checkpoints/, metrics.jsonl, tensorboard/, loss.png. A workdir with
  # checkpoints resumes from the latest one. Local or gs://bucket/path (the gcp extra).
  workdir: str = "runs/default"
  # Optimizer steps of the whole run (the schedule's length).
  steps: int = 300
  # Global batch, in sequences of seq_len tokens (summed over all hosts and micro-batches).
  batch_size: int = 8
  seq_len: int = 128
  # "cce": cce_jax.linear_cross_entropy; "naive": materialized logits through optax.
  loss_impl: str = "cce"
  seed: int = 0
  # Save a checkpoint every this many steps (and at the end, and on SIGTERM).
  checkpoint_every: int = 100
  # Log metrics every this many steps.
  log_every: int = 10
  # Evaluate on the held-out split every this many steps (and at the end); 0: never.
  eval_every: int = 100
  # Held-out batches (of batch_size sequences) per evaluation.
  eval_batches: int = 4
  # Micro-batches per step: the batch is split and the gradients summed in a scan.
  grad_accum_steps: int = 1
  # Checkpoints kept on disk.
  keep_checkpoints: int = 3
  # "auto": jax.distributed.initialize() when the environment says so (JAX_COORDINATOR_ADDRESS,
  # Slurm, TPU pod); "on": always; "off": never. YAML reads an unquoted on/off (also from
  # `distributed=on` on the command line) as true/false; those mean "on"/"off".
  distributed: str | bool = "auto"
  # Console progress bar (on a terminal; false, or output not a terminal: one plain line per
  # logged step, train/progress.py), TensorBoard events, final PNG plot.
  progress: bool = True
  tensorboard: bool = True
  plot: bool = True
  # Stop with an error after this many steps in a row whose loss or gradient norm is not
  # finite (each such step's update is skipped: parameters and optimizer state unchanged).
  max_skipped_steps: int = 10
  # Take the workdir's lock even if another live run (or another host) seems to hold it.
  force_unlock: bool = False
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  data: data.DataConfig = dataclasses.field(default_factory=data.DataConfig)
  # The slice or machine this config is sized for (train/hardware.py); null: none.
  hardware: HardwareConfig = dataclasses.field(default_factory=HardwareConfig)

  def __post_init__(self):
    _require(
      isinstance(self.workdir, str) and self.workdir.strip() != "",
      f"workdir must name a directory (a local path or gs://bucket/path), got {self.workdir!r}",
    )
    check_ranges(self, TRAIN_RANGES, "", ConfigError)
    _require(
      self.loss_impl in LOSS_IMPLS, f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}"
    )
    if isinstance(self.distributed, bool):
      object.__setattr__(self, "distributed", "on" if self.distributed else "off")
    _require(
      self.distributed in ("auto", "on", "off"),
      f"distributed must be 'auto', 'on' or 'off', got {self.distributed!r}",
    )
    _require(
      self.batch_size % self.grad_accum_steps == 0,
      f"batch_size={self.batch_size} must be a multiple of "
      f"grad_accum_steps={self.grad_accum_steps}",
    )
    if self.loss.grad_in_forward:
      rule = self.mesh.rules.get("vocab")
      listed = [rule] if rule is None or isinstance(rule, str) else list(rule)
      split = [a for a in listed if a is not None and getattr(self.mesh, a) != 1]
      _require(
        not split,
        f"loss.grad_in_forward=true needs an unsplit vocabulary, but mesh.rules.vocab={rule!r} "
        f"splits it over {split} (size -1 or > 1): set mesh.{split[0] if split else ''}=1 or "
        "mesh.rules.vocab=null, or loss.grad_in_forward=false",
      )
    chunk = self.model.attention_chunk
    _require(
      chunk is None or chunk >= self.seq_len or self.seq_len % chunk == 0,
      f"model.attention_chunk={chunk} must divide seq_len={self.seq_len} "
      "(or be null, or >= seq_len)",
    )


# seq_len >= 2: a sequence needs a token and its successor (shifted targets).
TRAIN_RANGES: dict[str, Range] = {
  **{
    name: at_least(1)
    for name in (
      "steps",
      "batch_size",
      "checkpoint_every",
      "log_every",
      "eval_batches",
      "grad_accum_steps",
      "keep_checkpoints",
      "max_skipped_steps",
    )
  },
  "seq_len": at_least(2),
  "seed": Range(low=0, high=MAX_SEED),
  "eval_every": at_least(0),
}


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain YAML values.


def _fields(cls: type) -> dict[str, Any]:
  """Field name -> resolved type of a dataclass."""
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _describe(value: Any) -> str:
  return f"{value!r} ({type(value).__name__})"


def _coerce(key: str, value: Any, kind: Any) -> Any:
  """``value`` as type ``kind``, or ConfigError naming ``key``."""
  origin = typing.get_origin(kind)
  if origin in (typing.Union, types.UnionType):
    options = typing.get_args(kind)
    if value is None and type(None) in options:
      return None
    for option in options:
      if option is type(None):
        continue
      try:
        return _coerce(key, value, option)
      except ConfigError:
        pass
    raise ConfigError(f"{key}: {_describe(value)} is none of {kind}")
  if dataclasses.is_dataclass(kind):
    return build(kind, value, prefix=key + ".")
  if kind is Any:
    return value
  if origin is typing.Literal:
    if value in typing.get_args(kind):
      return value
    raise ConfigError(f"{key}: expected one of {typing.get_args(kind)}, got {_describe(value)}")
  if origin is tuple:
    if isinstance(value, str) or not isinstance(value, Sequence):
      raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
    (item_kind, *_) = typing.get_args(kind) or (Any,)
    return tuple(_coerce(f"{key}[{i}]", v, item_kind) for i, v in enumerate(value))
  if origin is not None and issubclass(origin, Mapping):
    if not isinstance(value, Mapping):
      raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
    return dict(value)
  if kind is bool:
    if isinstance(value, bool):
      return value
    raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
  if kind is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
  if kind is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
      with contextlib.suppress(ValueError):
        return float(value)
    raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
  if kind is str:
    if isinstance(value, str):
      return value
    raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
  raise ConfigError(f"{key}: unsupported field type {kind}")


def valid_keys(cls: type | None = None, prefix: str = "") -> list[str]:
  """Every settable key of ``cls`` (default :class:`TrainConfig`), dotted for nested ones."""
  cls = cls or TrainConfig
  keys = []
  for name, kind in _fields(cls).items():
    if dataclasses.is_dataclass(kind):
      keys.extend(valid_keys(kind, prefix + name + "."))
    else:
      keys.append(prefix + name)
  return keys


def build(cls: type, values: Mapping[str, Any] | None, prefix: str = "") -> Any:
  """An instance of dataclass ``cls`` from a mapping of (possibly nested) plain values.

  Raises:
    ConfigError: an unknown key (the message lists the valid ones) or a bad value.
  """
  values = {} if values is None else values
  if not isinstance(values, Mapping):
    raise ConfigError(
      f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_describe(values)}"
    )
  fields = _fields(cls)
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(
      f"unknown config key(s) {[prefix + str(k) for k in unknown]}; valid keys: "
      + ", ".join(valid_keys(cls, prefix))
    )
  kwargs = {}
  for name, value in values.items():
    kind = fields[name]
    if dataclasses.is_dataclass(kind):
      kwargs[name] = build(kind, value, prefix + name + ".")
    else:
      kwargs[name] = _coerce(prefix + name, value, kind)
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (TypeError, ValueError) as error:  # a dataclass of another module (data.DataConfig)
    raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from error


def to_dict(config: Any) -> Any:
  """Plain (YAML-able) values of a config dataclass, nested."""
  if dataclasses.is_dataclass(config):
    return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
  if isinstance(config, Mapping):
    return {k: to_dict(v) for k, v in config.items()}
  if isinstance(config, (tuple, list)):
    return [to_dict(v) for v in config]
  return config


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
  parts = key.split(".")
  node = tree
  for part in parts[:-1]:
    child = node.get(part)
    if child is None:
      child = node[part] = {}
    if not isinstance(child, dict):
      raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node = child
  node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
  """``"model.num_layers=2"`` -> ``("model.num_layers", 2)`` (the value parsed as YAML)."""
  key, sep, raw = text.partition("=")
  if not sep or not key.strip():
    raise ConfigError(f"override {text!r} is not key=value; valid keys: " + ", ".join(valid_keys()))
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError as error:
    raise ConfigError(f"override {text!r}: value is not valid YAML ({error})") from error
  return key.strip(), value


def load(path: str | pathlib.Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
  """The config of YAML file ``path`` (default ``configs/default.yaml``) with ``overrides``.

  Args:
    path: a YAML file; None looks for ``configs/default.yaml`` in the current directory,
      then in the repository this package lives in, and else (an installed package) uses the
      dataclass defaults, which equal that file (a test checks it).
    overrides: ``key=value`` strings, dotted keys for nested fields.

  Raises:
    ConfigError: a missing or unreadable file, invalid YAML, an unknown key or a bad value (the
      message names it).
  """
  if path is None:
    found = [p for p in (DEFAULT_CONFIG, REPO_ROOT / DEFAULT_CONFIG) if p.is_file()]
    # Installed without the repository's configs/: the dataclass defaults are the default
    # config (a test keeps them equal).
    path = found[0] if found else None
  if path is None:
    tree = {}
  else:
    path = pathlib.Path(path)
    if not path.is_file():
      raise ConfigError(f"config file {str(path)!r} not found")
    try:
      tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
      raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    except (OSError, UnicodeDecodeError) as error:
      raise ConfigError(f"config file {str(path)!r} cannot be read: {error}") from None
  if not isinstance(tree, dict):
    raise ConfigError(f"{path}: expected a YAML mapping at the top level")
  # Rules are merged key by key into the defaults, so a config names only what it changes.
  mesh = tree.setdefault("mesh", {}) or {}
  tree["mesh"] = mesh
  mesh["rules"] = {**DEFAULT_RULES, **(mesh.get("rules") or {})}
  for text in overrides:
    key, value = parse_override(text)
    _set_dotted(tree, key, value)
  return build(TrainConfig, tree)
