"""The train state, and the jitted init / train / eval steps with their shardings.

The train state is a pytree of plain arrays (parameters as a nested dict, the optax state,
the step and the run's RNG key data) so that optax, Orbax and ``jax.jit`` see the same
structure. The model is rebuilt inside each step from the static ``nnx.GraphDef``.

Gradient accumulation is an explicit ``lax.scan`` over ``grad_accum_steps`` micro-batches
inside one step (one optimizer update per step, gradients summed in f32), not
``optax.MultiSteps``: the step counter, the learning-rate schedule, the data iterator and the
checkpoints then all count optimizer steps, so resuming needs no extra bookkeeping. Each
micro-batch's loss is divided by the number of targets of the whole batch, so the accumulated
gradient is the gradient of the batch mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train.config import TrainConfig
from train.eval_stats import eval_stat_sums
from train.loss import LossLayout, loss_sum
from train.model import Transformer
from train.optimizer import learning_rate_schedule, make_optimizer
from train.sharding import LogicalRules, batch_sharding, check_divisible, constrain, logical_rules

Params = dict[str, Any]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the data iterator."""

  step: jax.Array  # () int32: optimizer steps taken
  params: Params  # nested dict of param_dtype arrays, as nnx.to_pure_dict gives them
  opt_state: optax.OptState
  rng: jax.Array  # (2,) uint32: jax.random.key_data of the run's key (dropout)


@dataclasses.dataclass(frozen=True)
class Program:
  """The compiled-to-be pieces of one run: jitted functions and the shardings they use.

  Attributes:
    init: ``init(seed: () int32) -> TrainState``, placed on ``state_shardings``.
    train_step: ``train_step(state, tokens (B, T) int32) -> (state, metrics)``; donates
      ``state``. metrics: ``loss``, ``grad_norm``, ``learning_rate`` (() f32 each) and
      ``skipped`` (() int32: 1 when the update was skipped, the loss, gradient norm or new
      parameters being non-finite; parameters and optimizer state are then unchanged).
    eval_step: ``eval_step(params, tokens (B, T)) -> (loss_sum () f32, num_targets () f32,
      stat_sums)``; ``stat_sums`` maps ``train.eval_stats.STAT_NAMES`` to () f32 sums over the
      targets (correct argmax count, entropy).
    abstract_state: the TrainState of ShapeDtypeStructs carrying their shardings.
    state_shardings: NamedShardings of the TrainState.
    batch_sharding: NamedSharding of a (B, T) token batch.
  """

  config: TrainConfig
  mesh: Mesh
  rules: LogicalRules
  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  init: Callable[..., TrainState]
  train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
  eval_step: Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
  abstract_state: TrainState
  state_shardings: TrainState
  batch_sharding: NamedSharding

  def abstract_batch(self, batch_size: int | None = None) -> jax.ShapeDtypeStruct:
    """The (B, T) int32 token batch as a ShapeDtypeStruct with its sharding."""
    cfg = self.config
    return jax.ShapeDtypeStruct(
      (batch_size or cfg.batch_size, cfg.seq_len), jnp.int32, sharding=self.batch_sharding
    )

  def lower_train_step(self, batch_size: int | None = None):
    """``jax.jit(...).lower`` of the train step on abstract inputs (nothing is allocated)."""
    with jax.set_mesh(self.mesh):
      return self.train_step.lower(self.abstract_state, self.abstract_batch(batch_size))


def _specs_to_shardings(mesh: Mesh, specs: Any) -> Any:
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )


def _with_sharding(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
    abstract,
    shardings,
  )


def _all_finite(tree: Any) -> jax.Array:
  """() bool: every floating-point entry of ``tree`` is finite."""
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(keep_new: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where ``keep_new`` (a () bool), else ``old``, leaf by leaf."""
  return jax.tree.map(lambda a, b: jnp.where(keep_new, a, b), new, old)


def build_program(cfg: TrainConfig, mesh: Mesh) -> Program:
  """The jitted init, train and eval steps of ``cfg`` on ``mesh``.

  ``cfg.model.vocab_size`` must be set (the trainer fills it from the data).

  Raises:
    train.config.ConfigError: a parameter or batch dimension the mesh does not divide.
  """
  model_cfg = cfg.model
  rules = logical_rules(cfg.mesh.rules)
  optimizer = make_optimizer(cfg.optim, cfg.steps)
  schedule = learning_rate_schedule(cfg.optim, cfg.steps)

  with nnx.logical_axis_rules(rules):
    abstract_model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_model_state = nnx.split(abstract_model)
    param_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_model_state))
  param_shardings = _specs_to_shardings(mesh, param_specs)
  loss_layout = LossLayout.from_rules(mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())

  def init(seed: jax.Array) -> TrainState:
    params_key, run_key = jax.random.split(jax.random.key(seed))
    model = Transformer(model_cfg, rngs=nnx.Rngs(params=params_key))
    params = nnx.to_pure_dict(nnx.state(model))
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      rng=jax.random.key_data(run_key),
    )

  abstract_state = jax.eval_shape(init, jnp.zeros((), jnp.int32))
  opt_shardings = optax.tree_map_params(
    optimizer,
    lambda _, sharding: sharding,
    abstract_state.opt_state,
    param_shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, NamedSharding),
  )
  state_shardings = TrainState(
    step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated
  )
  check_divisible(abstract_state, state_shardings)
  tokens_sharding = batch_sharding(mesh, rules)
  micro_batch = cfg.batch_size // cfg.grad_accum_steps
  check_divisible(jax.ShapeDtypeStruct((micro_batch, cfg.seq_len), jnp.int32), tokens_sharding)

  def loss_fn(
    params: Params, tokens_BT: jax.Array, key: jax.Array | None, num_targets: int
  ) -> jax.Array:
    model = nnx.merge(graphdef, params)
    h_BTD = model(tokens_BT, key)
    classifier, layout = model.classifier()
    total = loss_sum(
      cfg.loss_impl,
      h_BTD,
      classifier,
      layout,
      tokens_BT,
      cfg.loss,
      model_cfg.final_softcap,
      loss_layout,
    )
    return total / num_targets

  def train_step(state: TrainState, tokens_BT: jax.Array):
    with nnx.logical_axis_rules(rules):
      batch, seq_len = tokens_BT.shape
      accum = cfg.grad_accum_steps
      num_targets = batch * (seq_len - 1)
      step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
      grad_fn = jax.value_and_grad(loss_fn)
      if accum == 1:
        loss, grads = grad_fn(state.params, tokens_BT, step_key, num_targets)
      else:
        # Micro-batch j holds rows j, M + j, 2M + j, ...: each device keeps its own rows.
        micro_MBT = tokens_BT.reshape(batch // accum, accum, seq_len).swapaxes(0, 1)
        micro_MBT = constrain(micro_MBT, (None, "act_batch", "act_seq"))

        def accumulate(carry, inputs):
          loss_acc, grads_acc = carry
          tokens, index = inputs
          loss, grads = grad_fn(
            state.params, tokens, jax.random.fold_in(step_key, index), num_targets
          )
          grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
          return (loss_acc + loss, grads_acc), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (loss, grads), _ = jax.lax.scan(
          accumulate,
          (jnp.zeros((), jnp.float32), zeros),
          (micro_MBT, jnp.arange(accum, dtype=jnp.int32)),
        )
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
      updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
      new_params = optax.apply_updates(state.params, updates)
      grad_norm = optax.tree.norm(grads)
      # The NaN guard: a step whose loss, gradient norm or updated parameters are not finite
      # keeps the old parameters and optimizer state (the step counter still advances).
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(new_params)
      params = _select(finite, new_params, state.params)
      opt_state = _select(finite, new_opt_state, state.opt_state)
      metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        "skipped": jnp.logical_not(finite).astype(jnp.int32),
      }
      return TrainState(
        step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng
      ), metrics

  def eval_step(params: Params, tokens_BT: jax.Array):
    with nnx.logical_axis_rules(rules):
      num_targets = tokens_BT.shape[0] * (tokens_BT.shape[1] - 1)
      model = nnx.merge(graphdef, params)
      h_BTD = model(tokens_BT, None)
      classifier, layout = model.classifier()
      head = (h_BTD, classifier, layout, tokens_BT, cfg.loss, model_cfg.final_softcap, loss_layout)
      total = loss_sum(cfg.loss_impl, *head)
      stat_sums = eval_stat_sums(cfg.loss_impl, *head)
      return total, jnp.asarray(num_targets, jnp.float32), stat_sums

  metric_shardings = {
    "loss": replicated,
    "grad_norm": replicated,
    "learning_rate": replicated,
    "skipped": replicated,
  }
  return Program(
    config=cfg,
    mesh=mesh,
    rules=rules,
    graphdef=graphdef,
    optimizer=optimizer,
    schedule=schedule,
    init=jax.jit(init, in_shardings=replicated, out_shardings=state_shardings),
    train_step=jax.jit(
      train_step,
      in_shardings=(state_shardings, tokens_sharding),
      out_shardings=(state_shardings, metric_shardings),
      donate_argnums=0,
    ),
    eval_step=jax.jit(
      eval_step,
      in_shardings=(param_shardings, tokens_sharding),
      out_shardings=(replicated, replicated, replicated),
    ),
    abstract_state=_with_sharding(abstract_state, state_shardings),
    state_shardings=state_shardings,
    batch_sharding=tokens_sharding,
  )
