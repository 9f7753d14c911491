"""The eval step's accuracy and entropy (``cce_jax.token_stats``) equal a materialized
computation on a tiny model. (That the trainer logs them as ``eval_accuracy`` and
``eval_entropy`` is checked by tests/test_train_smoke.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testing
from flax import nnx

from train import config, trainer
from train.sharding import make_mesh
from train.step import build_program

DATA_VOCAB = 300  # the model's vocabulary: rounded up to 384


def _program(tmp_path, *extra: str):
  args = train_testing.overrides(tmp_path / "run", tmp_path / "cache", *extra)
  cfg = trainer.with_vocab(config.load(None, args), DATA_VOCAB)
  return build_program(cfg, make_mesh(cfg.mesh))


def _logits_fn(program):
  """jitted (params, tokens (B, T)) -> float32 logits (B, T, V) of the model's head."""

  def logits(params, tokens_BT):
    with nnx.logical_axis_rules(program.rules):
      model = nnx.merge(program.graphdef, params)
      h_BTD = model(tokens_BT, None)
      classifier, layout = model.classifier()
      equation = "btd,vd->btv" if layout == "vd" else "btd,dv->btv"
      logits_BTV = jnp.einsum(equation, h_BTD, classifier, preferred_element_type=jnp.float32)
      softcap = program.config.model.final_softcap
      return logits_BTV if softcap is None else softcap * jnp.tanh(logits_BTV / softcap)

  return jax.jit(logits)


@pytest.mark.parametrize(
  "extra",
  [
    (),
    pytest.param(("loss_impl=naive",), marks=pytest.mark.slow),
    pytest.param(("model.final_softcap=5.0", "model.tie_embeddings=false"), marks=pytest.mark.slow),
  ],
)
def test_eval_accuracy_and_entropy_match_the_materialized_logits(tmp_path, extra):
  program = _program(tmp_path, *extra)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, DATA_VOCAB, (8, 32)).astype(np.int32)
  with jax.set_mesh(program.mesh):
    params = program.init(jnp.asarray(0, jnp.int32)).params
    logits_fn = _logits_fn(program)
    # Greedy decoding at every third position: the target there is the model's own argmax
    # (position i only sees tokens[: i + 1], which later edits leave alone), so the accuracy
    # is about a third, not the ~0 of an untrained model on random tokens.
    for i in range(0, 31, 3):
      logits = np.asarray(logits_fn(params, jnp.asarray(tokens)))
      tokens[:, i + 1] = logits[:, i].argmax(-1)
    loss_sum, num_targets, sums = program.eval_step(params, jnp.asarray(tokens))
    logits = np.asarray(logits_fn(params, jnp.asarray(tokens)), np.float64)[:, :-1]
  assert float(num_targets) == 8 * 31
  z = logits - logits.max(-1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
  entropy = -(np.exp(log_p) * log_p).sum(-1)
  hits = logits.argmax(-1) == tokens[:, 1:]
  np.testing.assert_allclose(float(sums["entropy"]), entropy.sum(), rtol=1e-5)
  assert int(sums["accuracy"]) == int(hits.sum())
  accuracy = float(sums["accuracy"]) / float(num_targets)
  assert 0.3 <= accuracy <= 1.0
  mean_entropy = float(sums["entropy"]) / float(num_targets)
  assert 0.0 <= mean_entropy <= np.log(program.config.model.vocab_size)
  expected_loss = -np.take_along_axis(log_p, tokens[:, 1:, None], -1).sum()
  np.testing.assert_allclose(float(loss_sum), expected_loss, rtol=1e-5)
