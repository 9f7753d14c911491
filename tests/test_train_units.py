"""Small pieces of the trainer: multi-host detection, vocabulary, optimizer, metrics files."""

from __future__ import annotations

import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from train import config, distributed, optimizer, trainer
from train.metrics import MetricsWriter, read_metrics
from train.sharding import make_mesh, mesh_shape


@pytest.mark.parametrize(
  "mode, env, expected",
  [
    ("auto", {}, False),
    ("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ("auto", {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
    ("auto", {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ("auto", {"TPU_WORKER_HOSTNAMES": "host0,host1"}, True),
    ("auto", {"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ("on", {}, True),
    ("off", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False),
  ],
)
def test_when_to_initialize_jax_distributed(mode, env, expected):
  assert distributed.should_initialize(mode, env) is expected


def test_initialize_arguments_read_the_fixed_variable_names():
  env = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "2",
  }
  assert distributed.initialize_arguments(env) == {
    "coordinator_address": "10.0.0.1:1234",
    "num_processes": 4,
    "process_id": 2,
  }
  assert distributed.initialize_arguments({}) == {}
  with pytest.raises(config.ConfigError, match="JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
    distributed.initialize_arguments({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})


def test_initialize_arguments_read_local_device_ids():
  env = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "2",
    "JAX_LOCAL_DEVICE_IDS": "0,1, 2,3",
  }
  assert distributed.initialize_arguments(env) == {
    "coordinator_address": "10.0.0.1:1234",
    "num_processes": 4,
    "process_id": 2,
    "local_device_ids": [0, 1, 2, 3],
  }
  # Without a coordinator (Slurm: JAX detects the rest), the ids still pass through.
  assert distributed.initialize_arguments({"JAX_LOCAL_DEVICE_IDS": "3"}) == {
    "local_device_ids": [3]
  }
  assert "local_device_ids" not in distributed.initialize_arguments(
    {key: value for key, value in env.items() if key != "JAX_LOCAL_DEVICE_IDS"}
  )
  assert distributed.initialize_arguments({"JAX_LOCAL_DEVICE_IDS": ""}) == {}


@pytest.mark.parametrize("value", ["gpu0", "0,,1", "0;1", "-1", "1,1", "0.5"])
def test_bad_local_device_ids_are_config_errors(value):
  with pytest.raises(config.ConfigError, match=re.escape(f"JAX_LOCAL_DEVICE_IDS={value!r}")):
    distributed.initialize_arguments({"JAX_LOCAL_DEVICE_IDS": value})


def test_single_process_loads_the_whole_batch():
  mesh = make_mesh(config.MeshConfig())
  sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
  assert distributed.process_rows(sharding, 8) == (0, 1)


def test_mesh_fills_the_minus_one_axis():
  assert mesh_shape(config.MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
  assert mesh_shape(config.MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
  with pytest.raises(config.ConfigError, match="not a multiple"):
    mesh_shape(config.MeshConfig(data=-1, fsdp=3, tensor=1), 8)
  with pytest.raises(config.ConfigError, match="set one axis to -1"):
    mesh_shape(config.MeshConfig(data=2, fsdp=2, tensor=1), 8)


def test_vocabulary_from_the_data():
  cfg = config.load(None, [])
  assert trainer.with_vocab(cfg, 32000).model.vocab_size == 32000
  assert trainer.with_vocab(cfg, 8000).model.vocab_size == 8064  # rounded up to 128
  fixed = config.load(None, ["model.vocab_size=1000"])
  assert trainer.with_vocab(fixed, 1000).model.vocab_size == 1000
  with pytest.raises(config.ConfigError, match="smaller than the data's vocabulary"):
    trainer.with_vocab(fixed, 1001)


def test_schedule_warms_up_then_decays_to_the_end_ratio():
  cfg = config.OptimConfig(learning_rate=1.0, warmup_steps=10, end_lr_ratio=0.1)
  schedule = optimizer.learning_rate_schedule(cfg, steps=100)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(100)) == pytest.approx(0.1)
  assert float(schedule(55)) == pytest.approx(0.55, abs=1e-6)  # cosine midpoint


def test_weight_decay_skips_norm_scales():
  params = {
    "embed": {"embedding": np.zeros((4, 2))},
    "layers": {
      "attn_norm": {"scale": np.zeros((2, 2))},
      "mlp": {"up": {"kernel": np.zeros((2, 2, 3))}},
    },
  }
  mask = optimizer.decay_mask(params)
  assert mask["embed"]["embedding"] and mask["layers"]["mlp"]["up"]["kernel"]
  assert not mask["layers"]["attn_norm"]["scale"]
  assert jax.tree.structure(mask) == jax.tree.structure(params)


def test_metrics_resume_drops_lines_past_the_checkpoint(tmp_path):
  lines = [{"step": s, "loss": 10.0 - s} for s in (1, 2, 3, 4)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  writer = MetricsWriter(
    tmp_path, total_steps=6, start_step=2, enabled=True, progress=False, tensorboard=False
  )
  writer.write(3, {"loss": 0.5})
  writer.close()
  assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
    (1, 9.0),
    (2, 8.0),
    (3, 0.5),
  ]


def test_metrics_writer_of_other_processes_writes_nothing(tmp_path):
  writer = MetricsWriter(
    tmp_path / "w", total_steps=2, start_step=0, enabled=False, progress=False, tensorboard=True
  )
  writer.write(1, {"loss": 1.0})
  assert writer.plot() is None
  writer.close()
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("chunk", [None, 4, 16])
def test_chunked_attention_equals_full_attention(chunk):
  """Value and gradients of query-chunked attention equal jax.nn.dot_product_attention's."""
  from train.model import causal_attention

  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 16, 4, 8))  # (B, T, H, Dh), GQA with 2 kv heads
  k = jax.random.normal(keys[1], (2, 16, 2, 8))
  v = jax.random.normal(keys[2], (2, 16, 2, 8))
  full = lambda q, k, v: jnp.sum(jnp.sin(jax.nn.dot_product_attention(q, k, v, is_causal=True)))
  chunked = lambda q, k, v: jnp.sum(jnp.sin(causal_attention(q, k, v, chunk)))
  expected = jax.value_and_grad(full, argnums=(0, 1, 2))(q, k, v)
  actual = jax.value_and_grad(chunked, argnums=(0, 1, 2))(q, k, v)
  chex.assert_trees_all_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_attention_chunk_must_divide_the_sequence():
  from train.model import causal_attention

  x = jnp.ones((1, 12, 2, 4))
  with pytest.raises(ValueError, match="attention_chunk=5 must divide seq_len=12"):
    causal_attention(x, x, x, 5)
