"""gcp/gke/jobset.sh offline: the rendered JobSets parse as YAML and hold the right hosts,
chips, selectors, trainer command and gs:// workdir for a v5p-32 slice and for 2 x 8 H100."""

from __future__ import annotations

import shlex
import subprocess

import pytest
import yaml
from gcp_testing import GCP, dry_run, run_script, shellcheck, write_env

DATA = {"DATA_PATHS": "gs://demo-bucket/tokens/train/shard-*.npy", "VOCAB_SIZE": "32000"}
WORKDIR = "workdir=gs://demo-bucket/runs/llama3-8b"
DATA_WORDS = [
  "data.source=tokens",
  "data.paths=[gs://demo-bucket/tokens/train/shard-*.npy]",
  "data.vocab_size=32000",
]


def _render(env_file, *args: str) -> dict:
  result = run_script("gke/jobset.sh", "--env", str(env_file), "render", *args)
  assert result.returncode == 0, result.stderr
  return yaml.safe_load(result.stdout)


def _pods(jobset: dict) -> tuple[dict, dict]:
  """(the replicated job's Job spec, its pod spec), after checking there is one of each."""
  assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and jobset["kind"] == "JobSet"
  [replicated] = jobset["spec"]["replicatedJobs"]
  assert replicated["replicas"] == 1
  job = replicated["template"]["spec"]
  return job, job["template"]["spec"]


def _commands(pod: dict) -> tuple[list[str], list[str]]:
  """The words of the preflight and of the trainer command the pod's shell runs."""
  [container] = pod["containers"]
  bash, flag, line = container["command"]
  assert (bash, flag) == ("bash", "-c")
  syntax = subprocess.run(["bash", "-n", "-c", line], capture_output=True, text=True)
  assert syntax.returncode == 0, syntax.stderr
  parts = [shlex.split(part) for part in line.split("; ")]
  [preflight] = [p for p in parts if p[:3] == ["python", "-m", "train.aot"]]
  [trainer] = [p for p in parts if p[:4] == ["exec", "python", "-m", "train"]]
  assert line.index("train.aot") < line.index("exec python -m train ")  # preflight first
  assert "git checkout -q --detach 0123abcd" in line  # the pod installs the pushed commit
  return preflight, trainer[1:]


def test_v5p32_slice(tmp_path):
  jobset = _render(write_env(tmp_path, **DATA))
  assert jobset["metadata"]["name"] == "llama3-8b"
  assert jobset["metadata"]["annotations"] == {
    "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
  }
  assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 20
  job, pod = _pods(jobset)
  # 4 hosts of 4 chips (16 chips, 32 TensorCores), topology 2x2x4, spot nodes.
  assert job["parallelism"] == job["completions"] == 4
  assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
    "cloud.google.com/gke-tpu-topology": "2x2x4",
    "cloud.google.com/gke-spot": "true",
  }
  [container] = pod["containers"]
  assert container["resources"]["limits"] == {"google.com/tpu": 4}
  assert container["resources"]["requests"] == {"google.com/tpu": 4}
  preflight, trainer = _commands(pod)
  assert preflight == [
    "python",
    "-m",
    "train.aot",
    "configs/llama3_8b_v5p32.yaml",
    *DATA_WORDS,
    "steps=100",
    "log_every=5",
  ]
  assert trainer == [
    "python",
    "-m",
    "train",
    "configs/llama3_8b_v5p32.yaml",
    WORKDIR,
    *DATA_WORDS,
    "distributed=on",
    "steps=100",
    "log_every=5",
  ]
  assert "'jax[tpu]'" in container["command"][2]


def test_2x8_h100(tmp_path):
  jobset = _render(write_env(tmp_path, CAPACITY="on-demand", **DATA), "gpu")
  assert "annotations" not in jobset["metadata"]
  assert jobset["spec"]["network"]["enableDNSHostnames"] is True
  job, pod = _pods(jobset)
  assert job["parallelism"] == job["completions"] == 2
  assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
  [container] = pod["containers"]
  assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
  env = {e["name"]: e for e in container["env"]}
  # One process per node; process 0's pod (job 0, index 0) of the JobSet's headless service
  # coordinates; each pod's id is its completion index.
  assert env["JAX_COORDINATOR_ADDRESS"]["value"] == "llama3-8b-workers-0-0.llama3-8b:1234"
  assert env["JAX_NUM_PROCESSES"]["value"] == "2"
  assert env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
    "metadata.annotations['batch.kubernetes.io/job-completion-index']"
  )
  assert {"containerPort": 1234} in container["ports"]
  assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
  preflight, trainer = _commands(pod)
  assert preflight[3] == trainer[3] == "configs/gemma2_2b.yaml"
  assert trainer[4:] == [WORKDIR, *DATA_WORDS, "distributed=on", "steps=100", "log_every=5"]
  assert "'jax[cuda12]'" in container["command"][2]


def test_h200_and_other_sizes(tmp_path):
  jobset = _render(
    write_env(
      tmp_path,
      GKE_GPU_ACCELERATOR="nvidia-h200-141gb",
      GKE_GPU_NODES="4",
      GKE_GPUS_PER_NODE="8",
      PREFLIGHT="false",
    ),
    "gpu",
  )
  job, pod = _pods(jobset)
  assert job["parallelism"] == 4
  assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-h200-141gb"
  assert "train.aot" not in pod["containers"][0]["command"][2]


@pytest.mark.parametrize(
  "accelerator, hosts, chips, selector, topology",
  [
    ("v5p-8", 1, 4, "tpu-v5p-slice", "2x2x1"),
    ("v5p-256", 32, 4, "tpu-v5p-slice", "4x4x8"),
    ("v6e-16", 4, 4, "tpu-v6e-slice", "4x4"),
    ("v5litepod-8", 1, 8, "tpu-v5-lite-podslice", "2x4"),
  ],
)
def test_tpu_types(tmp_path, accelerator, hosts, chips, selector, topology):
  job, pod = _pods(_render(write_env(tmp_path, ACCELERATOR_TYPE=accelerator)))
  assert job["parallelism"] == hosts
  assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": chips}
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == selector
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == topology


def test_apply_status_delete_dry_run(tmp_path):
  env_file = write_env(tmp_path, GKE_CLUSTER="demo-cluster", GKE_LOCATION="us-east5")
  credentials = [
    "gcloud",
    "container",
    "clusters",
    "get-credentials",
    "demo-cluster",
    "--location=us-east5",
    "--project=demo-project",
  ]
  result = run_script("gke/jobset.sh", "--env", str(env_file), "--dry-run", "apply", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert [shlex.split(line) for line in result.stdout.splitlines()] == [
    credentials,
    ["kubectl", "apply", "--namespace=default", "-f", "logs/gke/llama3-8b.yaml"],
  ]
  written = yaml.safe_load((tmp_path / "logs" / "gke" / "llama3-8b.yaml").read_text())
  assert written == _render(env_file)
  assert dry_run("gke/jobset.sh", env_file, "delete") == [
    credentials,
    ["kubectl", "delete", "jobset", "llama3-8b", "--namespace=default"],
  ]
  assert dry_run("gke/jobset.sh", env_file, "status")[1:] == [
    ["kubectl", "get", "jobset", "llama3-8b", "--namespace=default"],
    [
      "kubectl",
      "get",
      "pods",
      "--namespace=default",
      "--selector=jobset.sigs.k8s.io/jobset-name=llama3-8b",
    ],
  ]


@pytest.mark.parametrize(
  "settings, args, message",
  [
    ({}, ["apply"], "GKE_CLUSTER"),
    ({"RUN_NAME": "Llama_3"}, ["render"], "RUN_NAME=Llama_3"),
    ({"ACCELERATOR_TYPE": "v5p-24"}, ["render"], "TPU_TOPOLOGY"),
    ({"GKE_GPU_NODES": "0"}, ["render", "gpu"], "GKE_GPU_NODES"),
    ({}, ["render", "cpu"], "tpu or gpu"),
    ({}, ["launch"], "unknown action"),
    ({"BUCKET": ""}, ["render"], "BUCKET"),
  ],
)
def test_bad_settings_are_named(tmp_path, settings, args, message):
  result = run_script("gke/jobset.sh", "--env", str(write_env(tmp_path, **settings)), *args)
  assert result.returncode == 1 and message in result.stderr, result.stderr
  assert result.stdout == ""


def test_help_and_shellcheck():
  result = run_script("gke/jobset.sh", "--help")
  assert result.returncode == 0 and result.stdout.startswith("usage:")
  assert "--dry-run" in result.stdout and "GKE_GPU_ACCELERATOR" in result.stdout
  assert "set -euo pipefail" in (GCP / "gke" / "jobset.sh").read_text()
  check = subprocess.run([shellcheck(), "gke/jobset.sh"], capture_output=True, text=True, cwd=GCP)
  assert check.returncode == 0, check.stdout + check.stderr
