"""The trainer's loss: every call of the language-model cross-entropy goes through here.

``loss_impl="cce"`` calls ``cce_jax.linear_cross_entropy`` (the logits are never built);
``loss_impl="naive"`` materializes the f32 logits and uses optax, for comparison. Both compute
the same objective, summed over the targets of the batch (position i predicts token i + 1):

    loss_n = lse_n - (1 - a) z_{n,t} - a mean_v z_nv + k lse_n**2

with a = ``label_smoothing``, k = ``z_loss`` and z the (optionally soft-capped) logits. The step
divides the sum by the number of targets of the whole (accumulated) batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

import cce_jax
from train.config import LossConfig
from train.sharding import LogicalRules, constrain


@dataclasses.dataclass(frozen=True)
class LossLayout:
  """How the loss is split over the mesh: tokens over ``token_axes``, V over ``vocab_axes``."""

  mesh: jax.sharding.Mesh
  token_axes: tuple[str, ...] | None
  vocab_axes: tuple[str, ...] | None

  @classmethod
  def from_rules(cls, mesh: jax.sharding.Mesh, rules: LogicalRules) -> LossLayout:
    """Tokens split like the activations' ``act_batch``, V like the parameters' ``vocab``."""
    table = dict(rules)

    def axes(name: str) -> tuple[str, ...] | None:
      value = table[name]
      return None if value is None else ((value,) if isinstance(value, str) else tuple(value))

    return cls(mesh=mesh, token_axes=axes("act_batch"), vocab_axes=axes("vocab"))


def cce_loss_sum(
  h_BTD: jax.Array,
  classifier: jax.Array,
  layout: str,
  tokens_BT: jax.Array,
  cfg: LossConfig,
  softcap: float | None,
  sharding: LossLayout,
) -> jax.Array:
  """Summed next-token loss by ``cce_jax.linear_cross_entropy``; () f32.

  The loss runs per device through ``shard_map`` (``mesh=``): each device takes its sequences
  and its slice of the vocabulary, and cce_jax combines the statistics across devices.

  Args:
    h_BTD: final hidden states (B, T, D), compute dtype.
    classifier: (V, D) with ``layout="vd"`` (tied embedding) or (D, V) with ``"dv"``, same
      dtype as ``h_BTD``.
    tokens_BT: int32 tokens (B, T); targets are ``tokens[:, 1:]``.
    cfg: z_loss, label smoothing and filtering options.
    softcap: final-logit soft-capping, or None.
    sharding: the mesh and the axes that split tokens and vocabulary.
  """
  return cce_jax.linear_cross_entropy(
    h_BTD,
    classifier,
    tokens_BT,
    shift=1,
    reduction="sum",
    softcap=softcap,
    z_loss=cfg.z_loss,
    label_smoothing=cfg.label_smoothing,
    filter_eps=cfg.filter_eps,
    filter_e_grad=cfg.filter_e_grad,
    filter_c_grad=cfg.filter_c_grad,
    impl=cfg.cce_impl,
    classifier_layout=layout,
    mesh=sharding.mesh,
    token_axes=sharding.token_axes,
    vocab_axis=sharding.vocab_axes,
    grad_in_forward=cfg.grad_in_forward,
  )


def naive_loss_sum(
  h_BTD: jax.Array,
  classifier: jax.Array,
  layout: str,
  tokens_BT: jax.Array,
  cfg: LossConfig,
  softcap: float | None,
  sharding: LossLayout,
) -> jax.Array:
  """The same sum through materialized (B, T-1, V) f32 logits and optax; () f32.

  XLA partitions it (the logits are constrained to the activation rules); ``sharding`` is
  unused.
  """
  del sharding
  equation = "btd,vd->btv" if layout == "vd" else "btd,dv->btv"
  logits_BTV = jnp.einsum(equation, h_BTD[:, :-1], classifier, preferred_element_type=jnp.float32)
  logits_BTV = constrain(logits_BTV, ("act_batch", "act_seq", "act_vocab"))
  if softcap is not None:
    logits_BTV = softcap * jnp.tanh(logits_BTV / softcap)
  targets_BT = tokens_BT[:, 1:]
  if cfg.label_smoothing:
    num_classes = logits_BTV.shape[-1]
    smoothed = optax.smooth_labels(jax.nn.one_hot(targets_BT, num_classes), cfg.label_smoothing)
    per_token = optax.softmax_cross_entropy(logits_BTV, smoothed)
  else:
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
  if cfg.z_loss:
    per_token = per_token + cfg.z_loss * jax.nn.logsumexp(logits_BTV, axis=-1) ** 2
  return jnp.sum(per_token)


LOSSES = {"cce": cce_loss_sum, "naive": naive_loss_sum}


def loss_sum(
  loss_impl: str,
  h_BTD: jax.Array,
  classifier: jax.Array,
  layout: str,
  tokens_BT: jax.Array,
  cfg: LossConfig,
  softcap: float | None,
  sharding: LossLayout,
) -> jax.Array:
  """Summed next-token loss of ``loss_impl`` ("cce" or "naive"); () f32.

  Raises:
    KeyError: an unknown ``loss_impl`` (the config rejects it before this).
  """
  return LOSSES[loss_impl](h_BTD, classifier, layout, tokens_BT, cfg, softcap, sharding)
