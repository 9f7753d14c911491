"""Throughput numbers of a logged step (tokens/s, MFU, ETA) and the plain log line showing them.

A pod's logs are files, not terminals: where stdout is not a terminal, or ``progress: false``,
the trainer prints one line per logged step instead of a progress bar::

    step 120/10000 loss 5.1234 lr 3.00e-04 grad_norm 0.812 tokens/s 61,440 time/step 17.1 s
    MFU 41.3% ETA 1d 22h 51m

(one line; ``eval_loss`` and ``eval_accuracy`` follow at evaluation steps). MFU is left out
where the devices' peak FLOP/s is unknown (a CPU; see ``train/hardware.py``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from train import hardware
from train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Throughput:
  """What turns a step time into tokens/s, MFU and ETA for one run."""

  # Tokens of one optimizer step (batch_size x seq_len, over all hosts).
  tokens_per_step: int
  # Model FLOPs per token, forward and backward (train.hardware.model_flops_per_token).
  flops_per_token: float
  num_devices: int
  # Peak bf16 FLOP/s of one device; None where unknown (then no MFU).
  device_peak_flops: float | None
  total_steps: int

  @classmethod
  def of(cls, cfg: TrainConfig, devices: Sequence[Any]) -> Throughput:
    """The throughput of ``cfg`` (``model.vocab_size`` set) on ``devices`` (jax.Device)."""
    return cls(
      tokens_per_step=cfg.batch_size * cfg.seq_len,
      flops_per_token=hardware.model_flops_per_token(cfg.model, cfg.seq_len),
      num_devices=len(devices),
      device_peak_flops=hardware.peak_flops(devices[0].device_kind),
      total_steps=cfg.steps,
    )

  def metrics(self, step: int, step_time_s: float) -> dict[str, float]:
    """``step_time_s``, ``tokens_per_s``, ``eta_s`` (seconds to the last step at this rate)
    and, where the peak is known, ``mfu`` (a fraction) after ``step`` steps."""
    tokens_per_s = self.tokens_per_step / step_time_s
    values = {
      "step_time_s": step_time_s,
      "tokens_per_s": tokens_per_s,
      "eta_s": step_time_s * max(self.total_steps - step, 0),
    }
    mfu = hardware.mfu(tokens_per_s, self.flops_per_token, self.num_devices, self.device_peak_flops)
    if mfu is not None:
      values["mfu"] = mfu
    return values


def format_duration(seconds: float) -> str:
  """``93784`` -> ``"1d 2h 3m"``; ``75`` -> ``"1m 15s"``; ``4.2`` -> ``"4s"``."""
  seconds = round(seconds)
  days, rest = divmod(seconds, 86400)
  hours, rest = divmod(rest, 3600)
  minutes, secs = divmod(rest, 60)
  if days:
    return f"{days}d {hours}h {minutes}m"
  if hours:
    return f"{hours}h {minutes}m"
  if minutes:
    return f"{minutes}m {secs}s"
  return f"{secs}s"


def format_line(step: int, total_steps: int, record: Mapping[str, float]) -> str:
  """The plain log line of one logged step's ``record`` (metrics.jsonl keys; those missing are
  left out)."""
  parts = [f"step {step}/{total_steps}"]
  shown = (
    ("loss", "loss {:.4f}"),
    ("learning_rate", "lr {:.2e}"),
    ("grad_norm", "grad_norm {:.3f}"),
    ("tokens_per_s", "tokens/s {:,.0f}"),
    ("step_time_s", "time/step {:.3g} s"),
  )
  parts += [text.format(record[key]) for key, text in shown if key in record]
  if "mfu" in record:
    parts.append(f"MFU {100 * record['mfu']:.1f}%")
  if "eta_s" in record:
    parts.append(f"ETA {format_duration(record['eta_s'])}")
  if "eval_loss" in record:
    parts.append(f"eval_loss {record['eval_loss']:.4f}")
  if "eval_accuracy" in record:
    parts.append(f"eval_accuracy {record['eval_accuracy']:.4f}")
  return " ".join(parts)


def is_terminal(*streams: TextIO) -> bool:
  """Whether every stream (default stdout and stderr) is an interactive terminal."""
  streams = streams or (sys.stdout, sys.stderr)
  return all(getattr(stream, "isatty", lambda: False)() for stream in streams)
