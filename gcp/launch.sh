#!/usr/bin/env bash
# Starts the trainer on every worker of the TPU slice.
set -euo pipefail
# shellcheck source=lib/tpu.sh
source "$(dirname "$0")/lib/tpu.sh"

usage() {
  cat <<USAGE
usage: gcp/launch.sh [--env FILE] [--dry-run] [--print-worker-command]

Runs the memory preflight \`python -m train.aot CONFIG\` on worker 0 (PREFLIGHT=false skips it;
a config that does not fit the chips stops the launch there), then starts
\`python -m train CONFIG workdir=WORKDIR [DATA] TRAIN_ARGS\` on every worker of TPU_NAME at once
(ssh --worker=all) in the background and returns. CONFIG defaults to
configs/llama3_8b_v5p32.yaml; WORKDIR to BUCKET/runs/RUN_NAME (a gs:// URL all hosts share:
Orbax writes the checkpoints there and a relaunch resumes from the newest). On a multi-host
slice distributed=on is added, so that jax.distributed.initialize() joins the hosts (it finds
the pod's topology itself). Each worker appends its output to ~/LOG_DIR/train.log (default
~/cce_jax_logs; gcp/logs.sh fetches them) and, when the trainer ends, writes its exit status to
~/LOG_DIR/exit_status. A worker whose trainer is still running refuses to start another.
[DATA]: with DATA_PATHS set (comma-separated shard globs, e.g.
gs://BUCKET/tokens/train/shard-*.npy), data.source=tokens data.paths=[DATA_PATHS], and
data.eval_paths=[EVAL_DATA_PATHS], data.vocab_size=VOCAB_SIZE when those are set.

  --print-worker-command   print the command line each worker runs, and nothing else
$(common_flags_help)
USAGE
}

parse_common_args "$@"
print_worker_command=0
for arg in "${ARGS[@]}"; do
  case $arg in
    --print-worker-command) print_worker_command=1 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done
load_env
require_slice
if ((print_worker_command)); then
  require_workdir
  worker_command
else
  launch_workers
fi
