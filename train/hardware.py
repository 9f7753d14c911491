"""The hardware a config is for, the chips JAX reports, and the model FLOPs behind MFU.

A config's ``hardware`` section names the slice or machine it is sized for::

    hardware: {chip: v5p, chips: 16, hbm_gib: 95}     # a TPU v5p-32: 16 chips of 95 GiB

``python -m train.aot`` compiles the config's step for ``chips`` devices and fails when the
per-device peak exceeds ``hbm_gib``; the trainer's log lines report MFU against the peak bf16
FLOP/s of the chips it runs on (:func:`peak_flops`, from :data:`CHIPS`). Nothing here imports
JAX: the config module uses it.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator model: its peak dense bf16 FLOP/s and its memory (HBM) per chip."""

  peak_bf16_flops: float
  hbm_gib: float


# Per chip (one JAX device): dense bf16 FLOP/s from the vendors' published specifications, and
# HBM in GiB, rounded (a "141 GB" H200 holds 140). A TPU v4 or v5p chip is one JAX device
# (megacore); GPUs are the SXM parts (the H100 PCIe: h100_pcie).
CHIPS: dict[str, Chip] = {
  "v4": Chip(275e12, 32),
  "v5e": Chip(197e12, 16),
  "v5p": Chip(459e12, 95),
  "v6e": Chip(918e12, 32),
  "a100": Chip(312e12, 80),
  "h100": Chip(989e12, 80),
  "h100_pcie": Chip(756e12, 80),
  "h200": Chip(989e12, 140),
}

# ``jax.Device.device_kind`` -> chip name: the first pattern that matches (lower case) wins.
_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
  (r"tpu v4", "v4"),
  (r"tpu v5 ?lite|tpu v5e", "v5e"),
  (r"tpu v5p?$", "v5p"),
  (r"tpu v6 ?lite|tpu v6e", "v6e"),
  (r"a100", "a100"),
  (r"h100.*pcie", "h100_pcie"),
  (r"h100", "h100"),
  (r"h200", "h200"),
)


def chip_of(device_kind: str) -> str | None:
  """The :data:`CHIPS` name of a ``jax.Device.device_kind`` ("TPU v5 lite" -> "v5e"), or None."""
  kind = device_kind.strip().lower()
  for pattern, name in _KIND_PATTERNS:
    if re.search(pattern, kind):
      return name
  return None


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one device of this kind; None where unknown (a CPU)."""
  name = chip_of(device_kind)
  return None if name is None else CHIPS[name].peak_bf16_flops


@dataclasses.dataclass(frozen=True)
class HardwareConfig:
  """The slice or machine a config is sized for; all null (the default): no particular one.

  Raises:
    ConfigError (from ``__post_init__``): an unknown chip, a count or memory that is not
    positive, or a chip without its count.
  """

  # A key of train.hardware.CHIPS: v4, v5e, v5p, v6e, a100, h100, h100_pcie, h200.
  chip: str | None = None
  # Chips (JAX devices) of the whole slice, over all hosts: a v5p-32 has 16.
  chips: int | None = None
  # Memory per chip, GiB: the per-device peak `python -m train.aot` allows.
  hbm_gib: float | None = None

  def __post_init__(self):
    from train.config import ConfigError  # here: train.config imports this module

    if self.chip is not None and self.chip not in CHIPS:
      raise ConfigError(f"hardware.chip must be one of {sorted(CHIPS)} or null, got {self.chip!r}")
    if self.chips is not None and self.chips < 1:
      raise ConfigError(f"hardware.chips must be >= 1 or null, got {self.chips}")
    if self.hbm_gib is not None and self.hbm_gib <= 0:
      raise ConfigError(f"hardware.hbm_gib must be > 0 or null, got {self.hbm_gib}")
    if self.chip is not None and self.chips is None:
      raise ConfigError(f"hardware.chips must be set when hardware.chip is ({self.chip!r})")


def matmul_params(model) -> int:
  """Parameters of the model's matrix multiplies: every layer's projections and the head.

  ``model`` is a ``train.config.ModelConfig`` with ``vocab_size`` set. The token embedding
  (a lookup) and the norms are left out; a tied head counts its table once.
  """
  d, heads, kv_heads, head_dim = model.d_model, model.num_heads, model.num_kv_heads, model.head_dim
  attention = d * head_dim * (2 * heads + 2 * kv_heads)  # q, o: (D, H*Dh); k, v: (D, K*Dh)
  mlp = 3 * d * model.mlp_dim  # SwiGLU: gate, up, down
  return model.num_layers * (attention + mlp) + d * model.vocab_size


def model_flops_per_token(model, seq_len: int) -> float:
  """Training FLOPs per token: 6 x matmul parameters + attention (forward and backward).

  Attention counts 12 x layers x heads x head_dim x seq_len (the score and value matmuls over
  the whole sequence, as in the PaLM paper's MFU; causal masking is not discounted). Remat's
  recomputation is not counted: this is model FLOPs, the numerator of MFU.
  """
  attention = 12 * model.num_layers * model.num_heads * model.head_dim * seq_len
  return float(6 * matmul_params(model) + attention)


def mfu(
  tokens_per_s: float, flops_per_token: float, num_devices: int, device_peak_flops: float | None
) -> float | None:
  """Model FLOPs utilization in [0, 1]: achieved model FLOP/s over the devices' peak; None
  where the peak is unknown."""
  if device_peak_flops is None or num_devices < 1:
    return None
  return tokens_per_s * flops_per_token / (num_devices * device_peak_flops)
