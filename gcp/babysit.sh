#!/usr/bin/env bash
# Keeps a training run going on a (spot) TPU slice until it finishes: creates the slice, sets it
# up, launches the trainer, and after a preemption deletes, recreates and relaunches.
set -euo pipefail
# shellcheck source=lib/tpu.sh
source "$(dirname "$0")/lib/tpu.sh"

usage() {
  cat <<USAGE
usage: gcp/babysit.sh [--env FILE] [--dry-run]

Every POLL_SECONDS (default 60) it looks at the slice and at worker 0's trainer, and acts:
  no slice                          create it (gcp/create.sh's command)
  WAITING_FOR_RESOURCES, ...        wait
  ACTIVE/READY, workers not set up  set up (gcp/setup.sh) and launch (gcp/launch.sh)
  ACTIVE/READY, trainer stopped     launch (e.g. after a reboot)
  ACTIVE/READY, trainer running     wait
  PREEMPTED, SUSPENDED, FAILED, ... delete the slice and create it again (at most
                                    MAX_RECREATES times, default 20)
A command that fails (gcloud or ssh) is tried again in the next round; 5 failures in a row
end it with status 1.
It exits 0 once the trainer has exited 0 (all CONFIG steps done; a SIGTERM on a surviving VM
also ends with a checkpoint and status 0: run it again to go on), and 1 if the trainer failed.
Every relaunch resumes from the newest checkpoint in WORKDIR. Run it where it may run for days
(tmux, screen, or a small VM). Under --dry-run it prints one round of every command it can run.

$(common_flags_help)
USAGE
}

parse_common_args "$@"
((${#ARGS[@]} == 0)) || die "unknown argument '${ARGS[0]}' (see --help)"
load_env
require_slice RUNTIME_VERSION CONFIG
require_remote_repo
require_workdir

if ((DRY_RUN)); then
  note "each round: the slice's state and worker 0's trainer"
  slice_state
  trainer_status
  note "on a lost slice: delete, create; once usable: set up, launch"
  delete_slice
  create_slice
  setup_workers
  launch_workers
  exit 0
fi

# Consecutive failed actions (a gcloud or ssh error: the slice may be going away under them)
# are retried in the next round; this many in a row end the babysitting.
FAILURES_ALLOWED=5
failures=0

# attempt WHAT FUNCTION...: runs the functions in order, stopping at the first that fails.
attempt() {
  local what=$1 step
  shift
  for step in "$@"; do
    if ! "$step"; then
      failures=$((failures + 1))
      ((failures < FAILURES_ALLOWED)) || die "$what failed $failures times in a row; giving up"
      note "$what failed ($failures of $FAILURES_ALLOWED in a row); trying again next round"
      return 0
    fi
  done
  failures=0
}

recreates=0
previous=""
while true; do
  state=$(slice_state)
  [[ $state == "$previous" ]] || note "$(slice_label) is $state"
  previous=$state
  if is_usable "$state"; then
    status=$(trainer_status 2>/dev/null | tail -n 1) || status=unreachable
    case $status in
      running) ;;
      exit:0)
        note "the trainer finished (exit status 0); checkpoints in $WORKDIR"
        exit 0
        ;;
      exit:*) die "the trainer failed on worker 0 ($status); gcp/logs.sh fetches the logs" ;;
      fresh) attempt "setup and launch" setup_workers launch_workers ;;
      stopped) attempt "launch" launch_workers ;;
      *) note "worker 0 did not answer ($status); asking again in $POLL_SECONDS s" ;;
    esac
  elif [[ $state == NOT_FOUND ]]; then
    attempt "create" create_slice
  elif is_lost "$state"; then
    ((recreates < MAX_RECREATES)) || die "$(slice_label) is $state again after $recreates recreation(s) (MAX_RECREATES); giving up"
    recreates=$((recreates + 1))
    note "recreating $(slice_label) ($recreates of at most $MAX_RECREATES)"
    attempt "recreate" delete_slice create_slice
  fi
  sleep "$POLL_SECONDS"
done
