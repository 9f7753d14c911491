# shellcheck shell=bash
# Cloud TPU operations shared by the TPU scripts: create, wait, describe, delete a slice (as a
# queued resource or a plain TPU VM), and ssh into its workers. The scripts call load_env first.

# shellcheck source=remote.sh
source "$(dirname "${BASH_SOURCE[0]}")/remote.sh"

# States of a queued resource (or a TPU VM) after which the slice is gone for good: it must be
# deleted and created again.
LOST_STATES=" PREEMPTED SUSPENDING SUSPENDED FAILED TERMINATED "

# require_slice [NAME...]: the settings every TPU script needs, and the named ones; sets
# WORKERS, the slice's host count.
require_slice() {
  require PROJECT ZONE TPU_NAME ACCELERATOR_TYPE "$@"
  WORKERS=$(num_workers)
}

gcloud_location() {
  echo "--project=$PROJECT" "--zone=$ZONE"
}

# num_workers: the hosts of ACCELERATOR_TYPE (or NUM_WORKERS when set). v2, v3, v4 and v5p
# count TensorCores (8 per host); v5e and v6e count chips (one host up to 8, else 4 per host).
num_workers() {
  if [[ -n ${NUM_WORKERS:-} ]]; then
    [[ $NUM_WORKERS =~ ^[1-9][0-9]*$ ]] || die "NUM_WORKERS must be a positive whole number, not '$NUM_WORKERS'"
    echo "$NUM_WORKERS"
    return
  fi
  local generation=${ACCELERATOR_TYPE%-*} size=${ACCELERATOR_TYPE##*-}
  [[ $size =~ ^[0-9]+$ ]] || die "cannot tell the hosts of ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set NUM_WORKERS"
  case $generation in
    v2 | v3 | v4 | v5p) echo $(((size + 7) / 8)) ;;
    v5litepod | v5e | v6e) if ((size <= 8)); then echo 1; else echo $((size / 4)); fi ;;
    *) die "cannot tell the hosts of ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set NUM_WORKERS" ;;
  esac
}

# capacity_flags: the gcloud flag of CAPACITY.
capacity_flags() {
  case $CAPACITY in
    spot) echo --spot ;;
    reserved) echo --reserved ;;
    on-demand) ;;
  esac
}

# create_slice: asks for the slice (queued resource or TPU VM); does not wait.
create_slice() {
  local flags
  read -r -a flags <<<"$(gcloud_location) $(capacity_flags)"
  if [[ $QUEUED == true ]]; then
    run gcloud compute tpus queued-resources create "$QR_NAME" "${flags[@]}" \
      "--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" \
      "--runtime-version=$RUNTIME_VERSION"
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" "${flags[@]}" \
      "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION"
  fi
}

# slice_state: prints the state of the queued resource (or the TPU VM): ACTIVE, READY,
# WAITING_FOR_RESOURCES, PREEMPTED, ..., NOT_FOUND when there is none, or UNKNOWN when gcloud
# failed otherwise (e.g. a network error).
slice_state() {
  local flags state errors
  read -r -a flags <<<"$(gcloud_location)"
  errors=$(mktemp)
  if [[ $QUEUED == true ]]; then
    state=$(run gcloud compute tpus queued-resources describe "$QR_NAME" "${flags[@]}" \
      "--format=value(state.state)" 2>"$errors") || state=FAILED_CALL
  else
    state=$(run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${flags[@]}" \
      "--format=value(state)" 2>"$errors") || state=FAILED_CALL
  fi
  if [[ $state == FAILED_CALL ]]; then
    if grep -q NOT_FOUND "$errors"; then state=NOT_FOUND; else state=UNKNOWN; fi
  fi
  rm -f "$errors"
  echo "${state:-UNKNOWN}"
}

is_usable() { [[ $1 == ACTIVE || $1 == READY ]]; }
is_lost() { [[ $LOST_STATES == *" $1 "* ]]; }

# wait_until_usable: polls every POLL_SECONDS until the slice is ACTIVE (READY); dies if it is
# lost or gone meanwhile. Under --dry-run prints the one describe command it would repeat.
wait_until_usable() {
  local state previous=""
  if ((DRY_RUN)); then
    slice_state
    return
  fi
  while true; do
    state=$(slice_state)
    [[ $state == "$previous" ]] || note "$(slice_label) is $state"
    previous=$state
    is_usable "$state" && return 0
    if is_lost "$state" || [[ $state == NOT_FOUND ]]; then
      die "$(slice_label) is $state; delete it (gcp/delete.sh) and create it again"
    fi
    sleep "$POLL_SECONDS"
  done
}

slice_label() {
  if [[ $QUEUED == true ]]; then
    echo "queued resource $QR_NAME"
  else
    echo "TPU VM $TPU_NAME"
  fi
}

# delete_slice: deletes the queued resource (with its TPU VM) or the TPU VM, without asking.
delete_slice() {
  local flags
  read -r -a flags <<<"$(gcloud_location)"
  if [[ $QUEUED == true ]]; then
    run gcloud compute tpus queued-resources delete "$QR_NAME" "${flags[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${flags[@]}" --quiet
  fi
}

# on_workers WORKER COMMAND: runs the command line over ssh on one worker (0, 1, ...) or `all`.
on_workers() {
  local flags
  read -r -a flags <<<"$(gcloud_location)"
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" "--worker=$1" "--command=$2"
}

setup_workers() {
  require_remote_repo
  note "setting up all $WORKERS worker(s) of $TPU_NAME at commit $REPO_COMMIT"
  on_workers all "$(setup_command)"
}

# worker_command: the command line launch_workers runs on every worker. A multi-host slice
# always joins its hosts with jax.distributed.initialize() (distributed=on).
worker_command() {
  if ((WORKERS > 1)); then
    train_command distributed=on
  else
    train_command
  fi
}

# launch_workers: the memory preflight on worker 0 (unless PREFLIGHT=false; a config that does
# not fit stops the launch there), then the trainer on every worker.
launch_workers() {
  require CONFIG
  require_workdir
  if [[ $PREFLIGHT == true ]]; then
    note "preflight: python -m train.aot $CONFIG on worker 0"
    on_workers 0 "$(preflight_command)"
  fi
  note "launching $CONFIG on all $WORKERS worker(s) of $TPU_NAME, workdir $WORKDIR"
  on_workers all "$(worker_command)"
}

# trainer_status: the status word (see status_command) of worker 0's trainer.
trainer_status() {
  on_workers 0 "$(status_command)"
}
