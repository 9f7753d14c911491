#!/usr/bin/env bash
# Runs benchmarks/tpu.py on a single-host TPU VM and copies its results back.
set -euo pipefail
# shellcheck source=lib/tpu.sh
source "$(dirname "$0")/lib/tpu.sh"

usage() {
  cat <<USAGE
usage: gcp/benchmark_tpu.sh [--env FILE] [--dry-run] [-- TPU.PY ARGUMENTS...]

On worker 0 of TPU_NAME (a single-host slice that gcp/create.sh and gcp/setup.sh made, e.g.
v5litepod-1, v5p-8 or v6e-1): installs the bench extra and runs benchmarks/tpu.py (arguments
after -- go to it, e.g. -- --impls xla,pallas_tpu,pallas_tpu-32MiB), then copies the JSON to
benchmarks/out/tpu-ACCELERATOR_TYPE-DATE.json here.

$(common_flags_help)
USAGE
}

parse_common_args "$@"
bench_args=()
if ((${#ARGS[@]})); then
  [[ ${ARGS[0]} == -- ]] || die "unknown argument '${ARGS[0]}' (see --help)"
  bench_args=("${ARGS[@]:1}")
fi
load_env
require_slice
((WORKERS == 1)) || die "benchmarks/tpu.py runs on one host, and ACCELERATOR_TYPE=$ACCELERATOR_TYPE has $WORKERS; use a single-host slice (e.g. v5litepod-1, v5p-8, v6e-1)"
remote_out=benchmarks/out/tpu.json
dest=benchmarks/out/tpu-$ACCELERATOR_TYPE-$(date -u +%Y%m%d-%H%M%S).json
on_workers 0 "set -euo pipefail; cd $(quote "$REMOTE_DIR"); . $(quote "$REMOTE_VENV")/bin/activate; pip install -q -e '.[bench]'; $(quote python benchmarks/tpu.py --out "$remote_out" "${bench_args[@]}")"
read -r -a location <<<"$(gcloud_location)"
run mkdir -p "$(dirname "$dest")"
run gcloud compute tpus tpu-vm scp "$TPU_NAME:$REMOTE_DIR/$remote_out" "$dest" "${location[@]}" --worker=0
note "results in $dest (record them in benchmarks/RESULTS.md)"
