#!/usr/bin/env bash
# One multi-GPU Compute Engine VM: create it, set it up, train on all its GPUs, delete it.
set -euo pipefail
# shellcheck source=lib/remote.sh
source "$(dirname "$0")/lib/remote.sh"

usage() {
  cat <<USAGE
usage: gcp/gpu_vm.sh [--env FILE] [--dry-run] [-f|--force] create|setup|launch|status|delete

A single VM with several GPUs (one process drives them all; no jax.distributed), set by
PROJECT, ZONE, BUCKET (or WORKDIR) and CAPACITY of the env file and:
  GPU_VM_NAME        the VM (required)
  GPU_MACHINE_TYPE   default a3-highgpu-8g (8 x H100 80GB); a2-ultragpu-8g: 8 x A100 80GB
  GPU_IMAGE_FAMILY   default common-cu128-ubuntu-2204-nvidia-570 (project
                     deeplearning-platform-release: CUDA and the NVIDIA driver)
  GPU_DISK_SIZE      default 500GB
  GPU_CONFIG         default configs/gemma2_2b.yaml
  GPU_JAX_INSTALL    default jax[cuda12]
REPO_URL, REPO_COMMIT, TRAIN_ARGS, REMOTE_DIR, REMOTE_VENV, LOG_DIR and PYTHON work as for TPUs.

  create   gcloud compute instances create (spot: --provisioning-model=SPOT)
  setup    install the project and JAX_INSTALL on the VM (as gcp/setup.sh does on TPUs)
  launch   start the trainer in the background (log: ~/LOG_DIR/train.log); resumes from WORKDIR
  status   print running, exit:N, stopped or fresh
  delete   delete the VM (asks first unless --force)

  -f, --force  delete without asking
$(common_flags_help)
USAGE
}

parse_common_args "$@"
force=0
action=""
for arg in "${ARGS[@]}"; do
  case $arg in
    -f | --force | -q | --quiet) force=1 ;;
    create | setup | launch | status | delete)
      [[ -z $action ]] || die "one action at a time, not '$action' and '$arg'"
      action=$arg
      ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done
[[ -n $action ]] || die "no action: create, setup, launch, status or delete (see --help)"
load_env
require PROJECT ZONE GPU_VM_NAME
: "${GPU_MACHINE_TYPE:=a3-highgpu-8g}"
: "${GPU_IMAGE_FAMILY:=common-cu128-ubuntu-2204-nvidia-570}"
: "${GPU_DISK_SIZE:=500GB}"
CONFIG=${GPU_CONFIG:-configs/gemma2_2b.yaml}
JAX_INSTALL=${GPU_JAX_INSTALL:-jax[cuda12]}
location=("--project=$PROJECT" "--zone=$ZONE")

on_vm() {
  run gcloud compute ssh "$GPU_VM_NAME" "${location[@]}" "--command=$1"
}

case $action in
  create)
    capacity=()
    case $CAPACITY in
      spot) capacity=(--provisioning-model=SPOT --instance-termination-action=STOP) ;;
      reserved) capacity=(--reservation-affinity=any) ;;
      on-demand) ;;
    esac
    run gcloud compute instances create "$GPU_VM_NAME" "${location[@]}" \
      "--machine-type=$GPU_MACHINE_TYPE" "--image-family=$GPU_IMAGE_FAMILY" \
      --image-project=deeplearning-platform-release "--boot-disk-size=$GPU_DISK_SIZE" \
      --maintenance-policy=TERMINATE --scopes=cloud-platform "${capacity[@]}"
    ;;
  setup)
    require_remote_repo
    on_vm "$(setup_command)"
    ;;
  launch)
    require_workdir
    on_vm "$(train_command)"
    ;;
  status) on_vm "$(status_command)" ;;
  delete)
    if ((!force && !DRY_RUN)); then
      confirm "Delete the VM $GPU_VM_NAME ($GPU_MACHINE_TYPE in $PROJECT/$ZONE)?"
    fi
    run gcloud compute instances delete "$GPU_VM_NAME" "${location[@]}" --quiet
    ;;
esac
