"""Configs and the command line: every config in configs/ names its hardware and fits it;
overrides and their errors.

The fit test runs ``python -m train.aot CONFIG`` in a subprocess per config: it compiles the
train step for abstract inputs (``jax.ShapeDtypeStruct`` with shardings; nothing is allocated,
no data is read) on as many forced CPU devices as the config's ``hardware.chips``, at the
config's full sizes, mesh and batch, and fails when the per-device peak exceeds
``hardware.hbm_gib`` (about 15 s of CPU each, the v5p-256 one for 128 devices included).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
import subprocess
import sys

import pytest
import train_testing

from train import aot, cli, config
from train.hardware import CHIPS
from train.sharding import mesh_shape

CONFIGS_DIR = train_testing.ROOT / "configs"
SHIPPED = ("default.yaml", "gemma2_2b.yaml", "llama3_8b_v5p32.yaml", "llama3_8b_v5p256.yaml")
TOP_LEVEL_KEYS = {
  "workdir": "/tmp/x",
  "steps": 40,
  "batch_size": 16,
  "seq_len": 64,
  "loss_impl": "naive",
  "seed": 3,
  "checkpoint_every": 7,
  "log_every": 2,
  "eval_every": 5,
}


def run_aot(*args: str, devices_env: int | None = None) -> subprocess.CompletedProcess:
  """``python -m train.aot ARGS`` from the repository root (CPU only; output captured)."""
  env = train_testing.subprocess_env(JAX_PLATFORMS="cpu")
  if devices_env is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_env}"
  return subprocess.run(
    [sys.executable, "-m", "train.aot", *args],
    cwd=train_testing.ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )


def test_configs_dir_holds_exactly_the_shipped_configs():
  assert sorted(p.name for p in CONFIGS_DIR.glob("*.yaml")) == sorted(SHIPPED)


def test_every_config_compiles_and_fits_its_hardware():
  # Two compiles at a time: XLA:CPU compiles on one core.
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    runs = dict(
      zip(SHIPPED, pool.map(lambda name: run_aot(f"configs/{name}"), SHIPPED), strict=True)
    )
  for name, run in runs.items():
    cfg = config.load(CONFIGS_DIR / name)
    assert run.returncode == 0, f"{name}:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    devices = cfg.hardware.chips or 1
    assert f"{name}: compiled for {devices} cpu devices" in run.stdout, run.stdout
    if cfg.hardware.hbm_gib is None:
      assert "no memory limit to check" in run.stdout
      continue
    peak = float(re.search(r"fits: peak ([0-9.]+) GiB per device", run.stdout).group(1))
    assert 0 < peak <= cfg.hardware.hbm_gib, run.stdout


def test_aot_fails_a_config_that_does_not_fit():
  # The default model on a made-up slice of 0.01 GiB chips: its peak of about 0.1 GiB per
  # device exceeds that. --devices 2 beats both XLA_FLAGS (3 devices) and hardware.chips (5).
  run = run_aot(
    "--devices",
    "2",
    "configs/default.yaml",
    "hardware.chip=v5e",
    "hardware.chips=5",
    "hardware.hbm_gib=0.01",
    devices_env=3,
  )
  assert run.returncode == 1, run.stdout + run.stderr
  assert "compiled for 2 cpu devices; mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in run.stdout
  peak = float(re.search(r"does NOT fit: peak ([0-9.]+) GiB per device", run.stdout).group(1))
  assert peak > 0.01 and "> 0.01 GiB (5 x v5e)" in run.stdout
  assert "grad_accum_steps" in run.stdout


def test_aot_real_devices_compiles_for_the_devices_jax_finds():
  # Here the "real" devices are 2 host devices; hardware.chips (5) is not forced.
  run = run_aot(
    "--real-devices",
    "configs/default.yaml",
    "hardware.chip=v5e",
    "hardware.chips=5",
    "hardware.hbm_gib=16",
    devices_env=2,
  )
  assert run.returncode == 0, run.stdout + run.stderr
  assert "compiled for 2 cpu devices; mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in run.stdout
  assert "fits: peak" in run.stdout and "<= 16.00 GiB (5 x v5e)" in run.stdout


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["configs/default.yaml", "--devices", "0"], "--devices must be >= 1, got 0"),
    (["configs/default.yaml", "stepz=1"], "unknown config key(s) ['stepz']"),
    (["configs/missing.yaml"], "config file 'configs/missing.yaml' not found"),
    (["configs/default.yaml", "hardware.chip=v9"], "hardware.chip must be one of"),
  ],
)
def test_aot_bad_config_is_one_line_and_status_2(args, message, capsys, monkeypatch):
  monkeypatch.chdir(train_testing.ROOT)
  assert aot.main(args) == 2
  out, err = capsys.readouterr()
  assert out == "" and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
  ("args", "message"),
  [
    (["configs/default.yaml", "--devices", "x"], "argument --devices: invalid int value: 'x'"),
    ([], "the following arguments are required: CONFIG.yaml"),
  ],
)
def test_aot_bad_arguments_are_one_line_and_status_2(args, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    aot.main(args)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1, err


def test_aot_help(capsys):
  with pytest.raises(SystemExit) as exit_info:
    aot.main(["--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for word in (
    "usage: python -m train.aot",
    "--devices N",
    "--real-devices",
    "key=value",
    "hardware.hbm_gib",
  ):
    assert word in out


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "default.yaml"])
def test_accelerator_configs_name_their_hardware_and_a_realistic_batch(name):
  cfg = config.load(CONFIGS_DIR / name)
  hardware = cfg.hardware
  assert hardware.chip in CHIPS and hardware.chips >= 8
  assert hardware.hbm_gib == CHIPS[hardware.chip].hbm_gib
  mesh_shape(cfg.mesh, hardware.chips)  # the mesh fills exactly the slice's chips
  tokens_per_step = cfg.batch_size * cfg.seq_len
  assert 0.5e6 <= tokens_per_step <= 4.2e6, tokens_per_step
  assert cfg.grad_accum_steps > 1  # the batch reaches that size through accumulation
  if hardware.chips > 8:  # a multi-host slice: every host joins, logs are files
    assert cfg.distributed == "on" and not cfg.progress


def test_default_config_names_no_hardware_and_equals_the_dataclass_defaults():
  # An installed package has no configs/ folder: `python -m train` then trains the defaults.
  from_file = config.load(CONFIGS_DIR / "default.yaml")
  assert from_file.hardware == config.HardwareConfig()
  assert from_file == config.TrainConfig()
  for field in dataclasses.fields(config.TrainConfig):
    assert getattr(from_file, field.name) == getattr(config.TrainConfig(), field.name), field.name


def test_configs_name_the_models_they_claim():
  gemma = config.load(CONFIGS_DIR / "gemma2_2b.yaml")
  llama = config.load(CONFIGS_DIR / "llama3_8b_v5p32.yaml")
  pod = config.load(CONFIGS_DIR / "llama3_8b_v5p256.yaml")
  assert (gemma.model.vocab_size, gemma.model.d_model, gemma.model.num_layers) == (256000, 2304, 26)
  assert gemma.model.tie_embeddings and gemma.model.final_softcap == 30.0 and gemma.model.remat
  assert (llama.model.vocab_size, llama.model.d_model, llama.model.num_layers) == (128256, 4096, 32)
  assert pod.model == llama.model
  assert (gemma.hardware.chip, llama.hardware.chips, pod.hardware.chips) == ("h100", 16, 128)


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
  cfg = config.load(
    None,
    [
      "model.num_layers=3",
      "optim.learning_rate=1e-3",
      "mesh.rules.vocab=null",
      "data.paths=[a.txt]",
      "data.source=text",
      "loss.filter_eps=null",
    ],
  )
  assert cfg.model.num_layers == 3 and cfg.optim.learning_rate == 1e-3
  assert cfg.mesh.rules["vocab"] is None and cfg.data.paths == ("a.txt",)
  assert cfg.loss.filter_eps is None


@pytest.mark.parametrize(
  ("override", "expected"),
  [
    ("distributed=on", "on"),
    ("distributed=off", "off"),
    ("distributed='on'", "on"),
    ("distributed=auto", "auto"),
    ("distributed=true", "on"),
  ],
)
def test_distributed_accepts_yaml_on_and_off(override, expected):
  # YAML reads an unquoted on/off as a boolean (gcp/launch.sh passes distributed=on).
  assert config.load(None, [override]).distributed == expected


@pytest.mark.parametrize(
  "override, message",
  [
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
  ],
)
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


def test_loss_grad_in_forward_reaches_the_loss_call(monkeypatch):
  """loss.grad_in_forward=true is passed to cce_jax.linear_cross_entropy (default false)."""
  from train import loss as train_loss

  assert config.load().loss.grad_in_forward is False
  cfg = config.load(None, ["loss.grad_in_forward=true"])
  assert cfg.loss.grad_in_forward is True
  seen = {}
  monkeypatch.setattr(
    train_loss.cce_jax, "linear_cross_entropy", lambda *a, **kw: seen.update(kw) or 0.0
  )
  layout = train_loss.LossLayout(mesh=None, token_axes=None, vocab_axes=None)
  train_loss.cce_loss_sum(None, None, "vd", None, cfg.loss, None, layout)
  assert seen["grad_in_forward"] is True


@pytest.mark.parametrize(
  ("overrides", "message"),
  [
    (["loss.grad_in_forward=maybe"], "loss.grad_in_forward: expected true or false"),
    (
      ["loss.grad_in_forward=true", "loss.cce_impl=reference"],
      "loss.grad_in_forward=true needs loss.cce_impl 'auto' or 'xla'",
    ),
    (
      ["loss.grad_in_forward=true", "mesh.tensor=2", "mesh.data=1"],
      "loss.grad_in_forward=true needs an unsplit vocabulary",
    ),
  ],
)
def test_loss_grad_in_forward_errors(overrides, message):
  with pytest.raises(config.ConfigError) as error:
    config.load(None, overrides)
  assert message in str(error.value)


def test_loss_grad_in_forward_with_an_unsplit_vocabulary_loads():
  cfg = config.load(None, ["loss.grad_in_forward=true", "mesh.tensor=2", "mesh.rules.vocab=null"])
  assert cfg.loss.grad_in_forward
