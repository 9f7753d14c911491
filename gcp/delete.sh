#!/usr/bin/env bash
# Deletes the TPU slice (queued resource and TPU VM), after a confirmation.
set -euo pipefail
# shellcheck source=lib/tpu.sh
source "$(dirname "$0")/lib/tpu.sh"

usage() {
  cat <<USAGE
usage: gcp/delete.sh [--env FILE] [--dry-run] [-f|--force]

Deletes the queued resource QR_NAME with its TPU VM (QUEUED=true) or the TPU VM TPU_NAME
(QUEUED=false). Asks first unless --force. The checkpoints in WORKDIR (on gs://) stay.

  -f, --force  do not ask
$(common_flags_help)
USAGE
}

parse_common_args "$@"
force=0
for arg in "${ARGS[@]}"; do
  case $arg in
    -f | --force | -q | --quiet) force=1 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done
load_env
require_slice
if ((!force && !DRY_RUN)); then
  confirm "Delete $(slice_label) ($ACCELERATOR_TYPE in $PROJECT/$ZONE)?"
fi
delete_slice
