#!/usr/bin/env bash
# Creates the TPU slice of the env file and waits until it is usable.
set -euo pipefail
# shellcheck source=lib/tpu.sh
source "$(dirname "$0")/lib/tpu.sh"

usage() {
  cat <<USAGE
usage: gcp/create.sh [--env FILE] [--dry-run]

Creates the TPU slice TPU_NAME (ACCELERATOR_TYPE, RUNTIME_VERSION; CAPACITY spot, reserved or
on-demand) in PROJECT/ZONE, then waits until it is usable. With QUEUED=true (the default) it
asks through a queued resource QR_NAME and polls it every POLL_SECONDS until ACTIVE (it may sit
in WAITING_FOR_RESOURCES for a long time); it fails if the request FAILED. With QUEUED=false it
runs \`gcloud compute tpus tpu-vm create\`, which returns once the VM is READY. A slice that
already exists is only waited for.

$(common_flags_help)
USAGE
}

parse_common_args "$@"
((${#ARGS[@]} == 0)) || die "unknown argument '${ARGS[0]}' (see --help)"
load_env
require_slice RUNTIME_VERSION

if ((DRY_RUN)); then
  create_slice
else
  state=$(slice_state)
  if [[ $state == NOT_FOUND ]]; then
    note "creating $(slice_label): $ACCELERATOR_TYPE ($WORKERS worker(s)), $CAPACITY"
    create_slice
  else
    note "$(slice_label) already exists ($state)"
  fi
fi
wait_until_usable
((DRY_RUN)) || note "$(slice_label) is ready: next, gcp/setup.sh"
