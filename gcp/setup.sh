#!/usr/bin/env bash
# Installs the project on every worker of the TPU slice.
set -euo pipefail
# shellcheck source=lib/tpu.sh
source "$(dirname "$0")/lib/tpu.sh"

usage() {
  cat <<USAGE
usage: gcp/setup.sh [--env FILE] [--dry-run]

On every worker of TPU_NAME at once (ssh --worker=all): installs PYTHON (default python3.11)
if missing, clones REPO_URL into REMOTE_DIR (default: this checkout's origin, into ~/cce_jax)
at REPO_COMMIT (default: this checkout's HEAD, which must be pushed), creates the venv
REMOTE_VENV there and installs JAX_INSTALL (default jax[tpu]) with the project's train and gcp
extras. Running it again moves an existing clone to REPO_COMMIT.

$(common_flags_help)
USAGE
}

parse_common_args "$@"
((${#ARGS[@]} == 0)) || die "unknown argument '${ARGS[0]}' (see --help)"
load_env
require_slice
setup_workers
