#!/usr/bin/env bash
# Copies every worker's trainer log of the TPU slice to this machine.
set -euo pipefail
# shellcheck source=lib/tpu.sh
source "$(dirname "$0")/lib/tpu.sh"

usage() {
  cat <<USAGE
usage: gcp/logs.sh [--env FILE] [--dry-run] [DEST]

Copies ~/LOG_DIR/train.log of each worker of TPU_NAME to DEST/worker-N.log (DEST defaults to
logs/TPU_NAME), one scp per worker.

$(common_flags_help)
USAGE
}

parse_common_args "$@"
((${#ARGS[@]} <= 1)) || die "unknown argument '${ARGS[1]}' (see --help)"
load_env
require_slice
dest=${ARGS[0]:-logs/$TPU_NAME}
read -r -a location <<<"$(gcloud_location)"
run mkdir -p "$dest"
for ((worker = 0; worker < WORKERS; worker++)); do
  run gcloud compute tpus tpu-vm scp "$TPU_NAME:$LOG_DIR/train.log" "$dest/worker-$worker.log" \
    "${location[@]}" "--worker=$worker"
done
