"""Configs and the command line: every config in configs/ compiles on 8 devices; overrides and
their errors.

The compile test runs ``python -m train.aot`` in subprocesses with 8 forced CPU devices: each
config's train step is lowered and compiled for abstract inputs (``jax.ShapeDtypeStruct`` with
shardings; nothing is allocated, no data is read), on the config's own mesh when it fits 8
devices and on a (data=2, fsdp=2, tensor=2) mesh otherwise (the pod config), at the config's
full sizes and batch.
"""

from __future__ import annotations

import concurrent.futures
import math
import pathlib
import subprocess
import sys

import pytest
import train_testing

from train import cli, config

CONFIGS = sorted((train_testing.ROOT / "configs").glob("*.yaml"))
DEVICES = 8
TOP_LEVEL_KEYS = {"workdir": "/tmp/x", "steps": 40, "batch_size": 16, "seq_len": 64,
                  "loss_impl": "naive", "seed": 3, "checkpoint_every": 7, "log_every": 2,
                  "eval_every": 5}


def _mesh_overrides(path: pathlib.Path) -> list[str]:
  mesh = config.load(path).mesh
  fixed = math.prod(s for s in (mesh.data, mesh.fsdp, mesh.tensor) if s != -1)
  if fixed <= DEVICES and DEVICES % fixed == 0:
    return []
  return ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def _compile_all() -> dict[str, subprocess.CompletedProcess]:
  env = train_testing.subprocess_env(
      XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}", JAX_PLATFORMS="cpu")

  def compile_one(path: pathlib.Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "train.aot", str(path), *_mesh_overrides(path)]
    return subprocess.run(command, cwd=train_testing.ROOT, env=env, capture_output=True,
                          text=True, timeout=900)

  # Two at a time: XLA:CPU compiles on one core.
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    return dict(zip([p.name for p in CONFIGS], pool.map(compile_one, CONFIGS), strict=True))


def test_every_config_compiles_on_8_devices():
  results = _compile_all()
  assert {"default.yaml", "gemma2_2b.yaml", "llama3_8b.yaml", "llama3_8b_pod.yaml"} <= set(results)
  for name, run in results.items():
    assert run.returncode == 0, f"{name}:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    assert f"{name}: compiled" in run.stdout, run.stdout


def test_configs_name_the_models_they_claim():
  gemma = config.load(train_testing.ROOT / "configs" / "gemma2_2b.yaml")
  llama = config.load(train_testing.ROOT / "configs" / "llama3_8b.yaml")
  pod = config.load(train_testing.ROOT / "configs" / "llama3_8b_pod.yaml")
  assert (gemma.model.vocab_size, gemma.model.d_model, gemma.model.num_layers) == (256000, 2304, 26)
  assert gemma.model.tie_embeddings and gemma.model.final_softcap == 30.0 and gemma.model.remat
  assert (llama.model.vocab_size, llama.model.d_model, llama.model.num_layers) == (128256, 4096, 32)
  assert pod.distributed == "on" and pod.model == llama.model


def test_default_config_is_the_cpu_run():
  cfg = config.load()
  assert cfg.data.source == "stdlib" and cfg.data.vocab_size == 32000
  assert cfg.loss_impl == "cce" and cfg.loss.filter_e_grad and not cfg.loss.filter_c_grad


@pytest.mark.parametrize("key", sorted(TOP_LEVEL_KEYS))
def test_top_level_keys_override_as_written(key):
  value = TOP_LEVEL_KEYS[key]
  cfg = config.load(None, [f"{key}={value}"])
  assert getattr(cfg, key) == value


def test_dotted_overrides_reach_nested_sections():
  cfg = config.load(None, ["model.num_layers=3", "optim.learning_rate=1e-3",
                           "mesh.rules.vocab=null", "data.paths=[a.txt]", "data.source=text",
                           "loss.filter_eps=null"])
  assert cfg.model.num_layers == 3 and cfg.optim.learning_rate == 1e-3
  assert cfg.mesh.rules["vocab"] is None and cfg.data.paths == ("a.txt",)
  assert cfg.loss.filter_eps is None


@pytest.mark.parametrize(("override", "expected"), [
    ("distributed=on", "on"), ("distributed=off", "off"), ("distributed='on'", "on"),
    ("distributed=auto", "auto"), ("distributed=true", "on")])
def test_distributed_accepts_yaml_on_and_off(override, expected):
  # YAML reads an unquoted on/off as a boolean (gcp/launch.sh passes distributed=on).
  assert config.load(None, [override]).distributed == expected


@pytest.mark.parametrize("override, message", [
    ("stepz=3", "unknown config key(s) ['stepz']"),
    ("model.layers=3", "unknown config key(s) ['model.layers']"),
    ("steps=many", "steps: expected an integer, got 'many'"),
    ("steps=0", "steps must be >= 1"),
    ("loss_impl=fused", "loss_impl must be one of ('cce', 'naive')"),
    ("model.num_kv_heads=3", "must divide model.num_heads"),
    ("batch_size=6", "batch_size=6 must be a multiple of grad_accum_steps=4"),
    ("mesh.rules.vocab=model", "mesh axes are ('data', 'fsdp', 'tensor')"),
    ("data.source=web", "DataConfig.source must be one of"),
    ("steps", "is not key=value"),
    ("distributed=maybe", "distributed must be 'auto', 'on' or 'off'"),
])
def test_bad_overrides_raise_config_error(override, message):
  extra = ["grad_accum_steps=4"] if override.startswith("batch_size") else []
  with pytest.raises(config.ConfigError) as error:
    config.load(None, [*extra, override])
  assert message in str(error.value)


def test_unknown_key_lists_the_valid_keys():
  with pytest.raises(config.ConfigError) as error:
    config.load(None, ["stepz=3"])
  for key in TOP_LEVEL_KEYS:
    assert key in str(error.value)
  assert "model.num_layers" in str(error.value)


def test_cli_reports_config_errors_with_status_2(capsys):
  assert cli.main(["configs/default.yaml", "stepz=3"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("config error: unknown config key(s) ['stepz']; valid keys: workdir")
  assert cli.main(["configs/missing.yaml"]) == 2
  assert "not found" in capsys.readouterr().err
  assert cli.main(["--help"]) == 0
  assert "usage: python -m train" in capsys.readouterr().out
