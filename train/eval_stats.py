"""Evaluation statistics beyond the loss: next-token accuracy and the softmax entropy.

Both come from ``cce_jax.token_stats`` in one pass over the vocabulary, without the logits,
split over the mesh like the loss (tokens over ``act_batch``, vocabulary over ``vocab``). The
eval step sums them over the batch's targets (position i predicts token i + 1); the trainer
divides by the number of targets and logs ``eval_accuracy`` and ``eval_entropy`` (nats).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import cce_jax
from train.config import LossConfig
from train.loss import LossLayout

# The names of the sums eval_stat_sums returns (and the trainer logs as eval_<name>).
STAT_NAMES = ("accuracy", "entropy")


def eval_stat_sums(
  loss_impl: str,
  h_BTD: jax.Array,
  classifier: jax.Array,
  layout: str,
  tokens_BT: jax.Array,
  cfg: LossConfig,
  softcap: float | None,
  sharding: LossLayout,
) -> dict[str, jax.Array]:
  """``{"accuracy": number of targets whose argmax is right, "entropy": summed entropy}``,
  each () f32, over the B x (T - 1) next-token targets of ``tokens_BT`` (B, T).

  ``cce_jax.token_stats`` runs with impl "reference" (materialized logits) when the loss
  does (``loss_impl="naive"`` or ``cce_impl="reference"``), else "xla" (its Pallas kernels
  compute the loss only).
  """
  materialized = loss_impl == "naive" or cfg.cce_impl == "reference"
  stats = cce_jax.token_stats(
    h_BTD,
    classifier,
    tokens_BT,
    shift=1,
    softcap=softcap,
    impl="reference" if materialized else "xla",
    classifier_layout=layout,
    mesh=sharding.mesh,
    token_axes=sharding.token_axes,
    vocab_axis=sharding.vocab_axes,
  )
  return {
    "accuracy": jnp.sum(stats.correct, dtype=jnp.float32),
    "entropy": jnp.sum(stats.entropy),
  }
