"""AdamW with linear warmup and cosine decay, after global-norm clipping (optax)."""

from __future__ import annotations

from typing import Any

import jax
import optax

from train.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate``, then cosine decay to ``end_lr_ratio`` of it."""
  warmup = max(0, min(cfg.warmup_steps, steps - 1))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(steps, warmup + 1),
    end_value=cfg.learning_rate * cfg.end_lr_ratio,
  )


def decay_mask(params: Any) -> Any:
  """True for the parameters weight decay applies to: all but the RMSNorm scales."""

  def decays(path, _):
    return not any("norm" in str(getattr(key, "key", "")) for key in path)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm (if ``clip_norm``) then AdamW on the schedule of ``steps`` steps."""
  adamw = optax.adamw(
    learning_rate_schedule(cfg, steps),
    b1=cfg.b1,
    b2=cfg.b2,
    eps=cfg.eps,
    weight_decay=cfg.weight_decay,
    mask=decay_mask,
  )
  if cfg.clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
