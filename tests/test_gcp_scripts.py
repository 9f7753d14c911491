"""The gcp/ scripts without a cloud: shellcheck, --help, the exact commands of --dry-run for a
v5p-32 pod slice (4 workers), errors for missing settings, and a fake ``gcloud`` that plays a
queued resource through WAITING_FOR_RESOURCES, ACTIVE and PREEMPTED."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess

import pytest
from gcp_testing import GCP, dry_run, install_fake, option, run_script, shellcheck, write_env

TPU_SCRIPTS = [
  "create.sh",
  "setup.sh",
  "launch.sh",
  "babysit.sh",
  "delete.sh",
  "logs.sh",
  "benchmark_tpu.sh",
]
SCRIPTS = [*TPU_SCRIPTS, "gpu_vm.sh"]
LOCATION = ["--project=demo-project", "--zone=us-east5-a"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "cce-pod", *LOCATION]
CREATE = [
  *QR,
  "create",
  "cce-pod-qr",
  *LOCATION,
  "--spot",
  "--node-id=cce-pod",
  "--accelerator-type=v5p-32",
  "--runtime-version=v2-alpha-tpuv5",
]
DESCRIBE = [*QR, "describe", "cce-pod-qr", *LOCATION, "--format=value(state.state)"]
DELETE = [*QR, "delete", "cce-pod-qr", *LOCATION, "--force", "--quiet"]


def test_shellcheck_clean():
  files = sorted(map(str, [*GCP.glob("*.sh"), *GCP.glob("lib/*.sh"), *GCP.glob("*.sbatch")]))
  assert len(files) >= 12, files
  result = subprocess.run([shellcheck(), *files], capture_output=True, text=True, cwd=GCP)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [*SCRIPTS, "slurm_train.sbatch"])
def test_every_script_is_strict_and_has_help(script):
  text = (GCP / script).read_text()
  assert "set -euo pipefail" in text
  result = run_script(script, "--help")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("usage:") and "--dry-run" in result.stdout


@pytest.fixture
def env_file(tmp_path):
  return write_env(tmp_path)


def test_create_dry_run(env_file):
  assert dry_run("create.sh", env_file) == [CREATE, DESCRIBE]


def test_create_dry_run_without_queued_resources(tmp_path):
  env_file = write_env(tmp_path, QUEUED="false", CAPACITY="reserved")
  assert dry_run("create.sh", env_file) == [
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "create",
      "cce-pod",
      *LOCATION,
      "--reserved",
      "--accelerator-type=v5p-32",
      "--version=v2-alpha-tpuv5",
    ],
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "describe",
      "cce-pod",
      *LOCATION,
      "--format=value(state)",
    ],
  ]


def _remote(command: list[str], worker: str) -> str:
  """The command line of a ``tpu-vm ssh`` command on ``worker``, checked to parse as bash."""
  assert command[: len(SSH)] == SSH and option(command, "worker") == worker, command
  remote = option(command, "command")
  syntax = subprocess.run(["bash", "-n", "-c", remote], capture_output=True, text=True)
  assert syntax.returncode == 0, (remote, syntax.stderr)
  return remote


def test_setup_dry_run(env_file):
  [command] = dry_run("setup.sh", env_file)
  remote = _remote(command, "all")
  for part in [
    "git clone -q https://example.com/cce_jax.git cce_jax",
    "git checkout -q --detach 0123abcd",
    "python3.11 -m venv .venv",
    "pip install -q 'jax[tpu]' -e '.[train,gcp]'",
  ]:
    assert part in remote


def test_launch_dry_run_runs_the_preflight_then_the_v5p32_config_on_all_workers(env_file):
  preflight, command = dry_run("launch.sh", env_file)
  # The memory preflight on worker 0 first, in the foreground: a config that does not fit
  # fails there (set -e) and the launch stops before any worker starts training.
  assert _remote(preflight, "0") == (
    "set -euo pipefail; cd cce_jax; . .venv/bin/activate; "
    "python -m train.aot configs/llama3_8b_v5p32.yaml steps=100 log_every=5"
  )
  remote = _remote(command, "all")
  worker = run_script("launch.sh", "--env", str(env_file), "--print-worker-command")
  assert worker.returncode == 0, worker.stderr
  assert remote == worker.stdout.strip()
  # 4 hosts: distributed=on joins them; TRAIN_ARGS come last and win.
  assert (
    "python -m train configs/llama3_8b_v5p32.yaml workdir=gs://demo-bucket/runs/llama3-8b "
    "distributed=on steps=100 log_every=5; "
  ) in remote
  assert "nohup bash -c" in remote and "train.log" in remote and "exit_status" in remote


def test_launch_without_preflight(tmp_path):
  [command] = dry_run("launch.sh", write_env(tmp_path, PREFLIGHT="false"))
  assert "train.aot" not in _remote(command, "all")


def test_launch_trains_on_token_shards_in_the_bucket(tmp_path):
  env_file = write_env(
    tmp_path,
    DATA_PATHS="gs://demo-bucket/tokens/train/shard-*.npy",
    EVAL_DATA_PATHS="gs://demo-bucket/tokens/eval/shard-*.npy",
    VOCAB_SIZE="128256",
  )
  preflight, command = dry_run("launch.sh", env_file)
  data = (
    "'data.paths=[gs://demo-bucket/tokens/train/shard-*.npy]' "
    "'data.eval_paths=[gs://demo-bucket/tokens/eval/shard-*.npy]' data.vocab_size=128256"
  )
  assert (
    f"python -m train.aot configs/llama3_8b_v5p32.yaml data.source=tokens {data} "
    "steps=100 log_every=5"
  ) in _remote(preflight, "0")
  words = shlex.split(_remote(command, "all"))
  inner = words[words.index("nohup") + 3]  # nohup bash -c 'python -m train ...'
  assert inner.startswith(
    "python -m train configs/llama3_8b_v5p32.yaml workdir=gs://demo-bucket/runs/llama3-8b "
    f"data.source=tokens {data} distributed=on steps=100 log_every=5;"
  )


def test_babysit_dry_run_lists_every_command(env_file):
  commands = dry_run("babysit.sh", env_file)
  setup, launch = dry_run("setup.sh", env_file), dry_run("launch.sh", env_file)
  assert commands[0] == DESCRIBE
  assert "echo running" in _remote(commands[1], "0")
  assert commands[2:] == [DELETE, CREATE, *setup, *launch]


def test_delete_dry_run(env_file):
  assert dry_run("delete.sh", env_file) == [DELETE]


def test_logs_dry_run_copies_each_of_the_4_workers(env_file):
  commands = dry_run("logs.sh", env_file)
  assert commands[0] == ["mkdir", "-p", "logs/cce-pod"]
  assert commands[1:] == [
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "scp",
      "cce-pod:cce_jax_logs/train.log",
      f"logs/cce-pod/worker-{i}.log",
      *LOCATION,
      f"--worker={i}",
    ]
    for i in range(4)
  ]


def test_benchmark_needs_a_single_host(tmp_path, env_file):
  result = run_script("benchmark_tpu.sh", "--env", str(env_file), "--dry-run")
  assert result.returncode == 1 and "single-host" in result.stderr
  commands = dry_run(
    "benchmark_tpu.sh",
    write_env(tmp_path, ACCELERATOR_TYPE="v6e-1"),
    "--",
    "--impls",
    "xla,pallas_tpu",
  )
  remote = _remote([*SSH[:5], *commands[0][5:]], "0")
  assert "python benchmarks/tpu.py --out benchmarks/out/tpu.json --impls xla,pallas_tpu" in remote
  scp = commands[2]
  assert scp[:6] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "scp",
    "cce-pod:cce_jax/benchmarks/out/tpu.json",
  ]
  assert scp[6].startswith("benchmarks/out/tpu-v6e-1-") and scp[6].endswith(".json")


def test_gpu_vm_dry_run(env_file):
  [create] = dry_run("gpu_vm.sh", env_file, "create")
  assert create[:7] == ["gcloud", "compute", "instances", "create", "cce-gpu", *LOCATION]
  assert "--machine-type=a3-highgpu-8g" in create and "--provisioning-model=SPOT" in create
  [setup] = dry_run("gpu_vm.sh", env_file, "setup")
  assert setup[:6] == ["gcloud", "compute", "ssh", "cce-gpu", *LOCATION]
  assert "pip install -q 'jax[cuda12]' -e '.[train,gcp]'" in option(setup, "command")
  [launch] = dry_run("gpu_vm.sh", env_file, "launch")
  assert (
    "python -m train configs/gemma2_2b.yaml workdir=gs://demo-bucket/runs/llama3-8b steps=100"
  ) in option(launch, "command")
  assert dry_run("gpu_vm.sh", env_file, "delete") == [
    ["gcloud", "compute", "instances", "delete", "cce-gpu", *LOCATION, "--quiet"]
  ]


@pytest.mark.parametrize(
  ("accelerator", "workers"),
  [
    ("v5p-32", 4),
    ("v5p-8", 1),
    ("v4-64", 8),
    ("v3-32", 4),
    ("v5litepod-16", 4),
    ("v5litepod-8", 1),
    ("v6e-256", 64),
    ("v6e-4", 1),
  ],
)
def test_worker_count(tmp_path, accelerator, workers):
  commands = dry_run("logs.sh", write_env(tmp_path, ACCELERATOR_TYPE=accelerator))
  assert len(commands) == 1 + workers


def test_num_workers_overrides_the_accelerator_type(tmp_path):
  commands = dry_run("logs.sh", write_env(tmp_path, ACCELERATOR_TYPE="tpu7x-x", NUM_WORKERS="2"))
  assert len(commands) == 1 + 2


def test_unknown_accelerator_asks_for_num_workers(tmp_path):
  result = run_script(
    "logs.sh", "--env", str(write_env(tmp_path, ACCELERATOR_TYPE="tpu7x-x")), "--dry-run"
  )
  assert result.returncode == 1 and "NUM_WORKERS" in result.stderr


@pytest.mark.parametrize(
  ("script", "drop", "named"),
  [
    ("create.sh", ("ZONE", "RUNTIME_VERSION"), ["ZONE", "RUNTIME_VERSION"]),
    ("setup.sh", ("PROJECT",), ["PROJECT"]),
    ("launch.sh", ("BUCKET",), ["BUCKET"]),
    ("babysit.sh", ("ACCELERATOR_TYPE", "TPU_NAME"), ["ACCELERATOR_TYPE", "TPU_NAME"]),
    ("delete.sh", ("TPU_NAME",), ["TPU_NAME"]),
    ("gpu_vm.sh", ("GPU_VM_NAME",), ["GPU_VM_NAME"]),
  ],
)
def test_missing_setting_is_named(tmp_path, script, drop, named):
  args = ["create"] if script == "gpu_vm.sh" else []
  result = run_script(script, "--env", str(write_env(tmp_path, drop)), "--dry-run", *args)
  assert result.returncode == 1 and result.stdout == ""
  assert "missing required setting" in result.stderr
  for name in named:
    assert name in result.stderr


@pytest.mark.parametrize(
  ("setting", "value"),
  [
    ("CAPACITY", "cheap"),
    ("QUEUED", "yes"),
    ("BUCKET", "my-bucket"),
    ("POLL_SECONDS", "1m"),
    ("NUM_WORKERS", "four"),
    ("MAX_RECREATES", "-1"),
  ],
)
def test_bad_setting_is_named(tmp_path, setting, value):
  result = run_script(
    "launch.sh", "--env", str(write_env(tmp_path, **{setting: value})), "--dry-run"
  )
  assert result.returncode == 1 and setting in result.stderr


@pytest.mark.parametrize("script", ["setup.sh", "babysit.sh"])
def test_a_local_repo_url_is_refused(tmp_path, script):
  result = run_script(
    script, "--env", str(write_env(tmp_path, REPO_URL="/home/me/cce_jax")), "--dry-run"
  )
  assert result.returncode == 1 and "REPO_URL=/home/me/cce_jax" in result.stderr


def test_missing_env_file_points_at_the_template(tmp_path):
  result = run_script("create.sh", "--env", str(tmp_path / "nope.env"))
  assert result.returncode == 1 and "gcp/env.example" in result.stderr


def test_unknown_argument(env_file):
  result = run_script("create.sh", "--env", str(env_file), "--zone=x")
  assert result.returncode == 1 and "--zone=x" in result.stderr


# --- A fake gcloud on PATH ----------------------------------------------------------------


class FakeCloud:
  """tests/gcp_fakes/fake_gcloud.py as ``gcloud`` on PATH, with its script and its calls."""

  def __init__(self, directory: pathlib.Path, **script):
    self.directory = directory
    self.directory.mkdir()
    (directory / "script.json").write_text(json.dumps(script))
    install_fake(directory / "bin", "gcloud", "fake_gcloud.py")
    self.env = {
      "FAKE_GCLOUD_DIR": str(directory),
      "PATH": f"{directory / 'bin'}{os.pathsep}{os.environ['PATH']}",
    }

  def run(self, script: str, env_file: pathlib.Path, *args: str, stdin: str = ""):
    return run_script(script, "--env", str(env_file), *args, env=self.env, stdin=stdin)

  def calls(self) -> list[str]:
    """Each call in short: the verb (create, describe, delete) or
    ssh:setup|preflight|launch|status."""
    short = []
    for line in (self.directory / "calls.jsonl").read_text().splitlines():
      argv = json.loads(line)
      if "ssh" in argv:
        remote = option(argv, "command")
        short.append(
          "ssh:"
          + (
            "setup"
            if "git clone" in remote
            else "preflight"
            if "train.aot" in remote
            else "launch"
            if "nohup" in remote
            else "status"
          )
        )
      else:
        short.append(argv[3])
    return short


@pytest.fixture
def fast_env(tmp_path):
  return write_env(tmp_path, POLL_SECONDS="0")


def test_create_waits_until_active(tmp_path, fast_env):
  cloud = FakeCloud(
    tmp_path / "cloud",
    lives=[["WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"]],
  )
  result = cloud.run("create.sh", fast_env)
  assert result.returncode == 0, result.stderr
  assert cloud.calls() == ["describe", "create", "describe", "describe", "describe", "describe"]
  assert "WAITING_FOR_RESOURCES" in result.stderr and "is ACTIVE" in result.stderr


def test_create_fails_when_the_request_fails(tmp_path, fast_env):
  cloud = FakeCloud(tmp_path / "cloud", lives=[["WAITING_FOR_RESOURCES", "FAILED"]])
  result = cloud.run("create.sh", fast_env)
  assert result.returncode == 1 and "is FAILED" in result.stderr


def test_babysit_recreates_and_relaunches_after_preemption(tmp_path, fast_env):
  cloud = FakeCloud(
    tmp_path / "cloud",
    lives=[
      ["WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE", "PREEMPTED"],
      ["WAITING_FOR_RESOURCES", "ACTIVE"],
    ],
    probes_before_exit=1,
  )
  result = cloud.run("babysit.sh", fast_env)
  assert result.returncode == 0, result.stderr
  first_life = [
    "describe",
    "create",
    "describe",
    "describe",
    "ssh:status",
    "ssh:setup",
    "ssh:preflight",
    "ssh:launch",
    "describe",
    "ssh:status",
  ]
  second_life = [
    "describe",
    "delete",
    "create",
    "describe",
    "describe",
    "ssh:status",
    "ssh:setup",
    "ssh:preflight",
    "ssh:launch",
    "describe",
    "ssh:status",
    "describe",
    "ssh:status",
  ]
  assert cloud.calls() == first_life + second_life
  assert "is PREEMPTED" in result.stderr and "recreating" in result.stderr
  assert "finished" in result.stderr


def test_babysit_retries_failed_commands(tmp_path, fast_env):
  # Calls 2 (the first create), 5 (a describe) and 8 (the first setup) fail once. A failed
  # describe is no reason to create anything.
  cloud = FakeCloud(tmp_path / "cloud", lives=[["ACTIVE"]], fail_calls=[2, 5, 8])
  result = cloud.run("babysit.sh", fast_env)
  assert result.returncode == 0, result.stderr
  assert cloud.calls() == [
    "describe",
    "create",
    "describe",
    "create",
    "describe",
    "describe",
    "ssh:status",
    "ssh:setup",
    "describe",
    "ssh:status",
    "ssh:setup",
    "ssh:preflight",
    "ssh:launch",
    "describe",
    "ssh:status",
  ]
  assert "create failed (1 of 5 in a row)" in result.stderr and "is UNKNOWN" in result.stderr
  assert "setup and launch failed (1 of 5 in a row)" in result.stderr


def test_a_failed_preflight_stops_the_launch(tmp_path, env_file):
  cloud = FakeCloud(tmp_path / "cloud", lives=[["ACTIVE"]], preflight_status=1)
  assert cloud.run("create.sh", env_file).returncode == 0
  result = cloud.run("launch.sh", env_file)
  assert result.returncode == 1
  assert cloud.calls()[-1] == "ssh:preflight"  # no worker was started


def test_babysit_gives_up_after_repeated_failures(tmp_path, fast_env):
  cloud = FakeCloud(tmp_path / "cloud", lives=[["ACTIVE"]], fail_calls=[2, 4, 6, 8, 10])
  result = cloud.run("babysit.sh", fast_env)
  assert result.returncode == 1 and "create failed 5 times in a row" in result.stderr


def test_babysit_gives_up_after_max_recreates(tmp_path):
  cloud = FakeCloud(tmp_path / "cloud", lives=[["ACTIVE", "PREEMPTED"], ["PREEMPTED"]])
  result = cloud.run("babysit.sh", write_env(tmp_path, POLL_SECONDS="0", MAX_RECREATES="1"))
  assert result.returncode == 1 and "MAX_RECREATES" in result.stderr
  assert cloud.calls().count("create") == 2


def test_babysit_reports_a_failed_trainer(tmp_path, fast_env):
  cloud = FakeCloud(tmp_path / "cloud", lives=[["ACTIVE"]], exit_status=3)
  result = cloud.run("babysit.sh", fast_env)
  assert result.returncode == 1 and "exit:3" in result.stderr
  assert cloud.calls()[-3:] == ["ssh:launch", "describe", "ssh:status"]


def test_delete_asks_first(tmp_path, env_file):
  cloud = FakeCloud(tmp_path / "cloud", lives=[["ACTIVE"]])
  refused = cloud.run("delete.sh", env_file, stdin="n\n")
  assert refused.returncode == 1 and "not confirmed" in refused.stderr
  assert not (cloud.directory / "calls.jsonl").exists()
  confirmed = cloud.run("delete.sh", env_file, stdin="y\n")
  assert confirmed.returncode == 0, confirmed.stderr
  forced = cloud.run("delete.sh", env_file, "--force")
  assert forced.returncode == 0, forced.stderr
  assert cloud.calls() == ["delete", "delete"]
