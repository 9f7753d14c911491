# shellcheck shell=bash
# The command lines that run on a worker (a TPU VM host or a GPU VM) over ssh, shared by the
# TPU and GPU scripts. Each is one line of bash run in the ssh user's home directory; every
# setting is shell-quoted into it. Paths relative to the home directory stay relative.

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# require_remote_repo: REPO_URL and REPO_COMMIT set, and REPO_URL one the workers can clone.
require_remote_repo() {
  require REPO_URL REPO_COMMIT
  case $REPO_URL in
    /* | ./* | ../* | file:*) die "REPO_URL=$REPO_URL is a path on this machine, which the workers cannot clone; set REPO_URL to a URL they can reach" ;;
  esac
}

# setup_command: installs Python (if missing), clones REPO_URL into REMOTE_DIR at REPO_COMMIT,
# creates the venv REMOTE_VENV there and installs JAX_INSTALL with the project's train and gcp
# extras. Safe to run again (an existing clone is fetched and moved to the commit).
setup_command() {
  local py dir venv
  read -r py dir venv <<<"$(quote "$PYTHON" "$REMOTE_DIR" "$REMOTE_VENV")"
  echo "set -euo pipefail;" \
    "command -v $py >/dev/null || { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $py $py-venv; };" \
    "[ -d $dir/.git ] || git clone -q $(quote "$REPO_URL") $dir;" \
    "cd $dir; git fetch -q origin; git checkout -q --detach $(quote "$REPO_COMMIT");" \
    "[ -x $venv/bin/python ] || $py -m venv $venv; . $venv/bin/activate;" \
    "pip install -q --upgrade pip; pip install -q $(quote "$JAX_INSTALL") -e '.[train,gcp]';" \
    "echo \"\$(hostname): cce_jax \$(git rev-parse --short HEAD) installed\""
}

# data_args: the trainer's data keys of DATA_PATHS (comma-separated shard globs, e.g.
# gs://bucket/tokens/train/shard-*.npy), EVAL_DATA_PATHS and VOCAB_SIZE, one per line; nothing
# when DATA_PATHS is unset (the config's own data section then applies).
data_args() {
  [[ -n ${DATA_PATHS:-} ]] || return 0
  echo "data.source=tokens"
  echo "data.paths=[$DATA_PATHS]"
  if [[ -n ${EVAL_DATA_PATHS:-} ]]; then echo "data.eval_paths=[$EVAL_DATA_PATHS]"; fi
  if [[ -n ${VOCAB_SIZE:-} ]]; then echo "data.vocab_size=$VOCAB_SIZE"; fi
}

# trainer_args [KEY=VALUE...]: CONFIG, workdir=WORKDIR, the data keys, the arguments, then
# TRAIN_ARGS (last, so they win), one per line.
trainer_args() {
  local extra=()
  read -r -a extra <<<"$TRAIN_ARGS"
  printf '%s\n' "$CONFIG" "workdir=$WORKDIR"
  data_args
  if (($#)); then printf '%s\n' "$@"; fi
  if ((${#extra[@]})); then printf '%s\n' "${extra[@]}"; fi
}

# preflight_args: the arguments of `python -m train.aot`, the memory preflight: CONFIG, the
# data keys and TRAIN_ARGS (the ones that decide the compiled step), one per line.
preflight_args() {
  local extra=()
  read -r -a extra <<<"$TRAIN_ARGS"
  echo "$CONFIG"
  data_args
  if ((${#extra[@]})); then printf '%s\n' "${extra[@]}"; fi
}

# preflight_command: runs `python -m train.aot CONFIG ...` in the foreground: it compiles the
# training step and fails (non-zero) when its memory exceeds the config's hardware, so that a
# launch stops before the run would run out of memory.
preflight_command() {
  local dir venv args=()
  read -r dir venv <<<"$(quote "$REMOTE_DIR" "$REMOTE_VENV")"
  mapfile -t args < <(preflight_args)
  echo "set -euo pipefail; cd $dir; . $venv/bin/activate; $(quote python -m train.aot "${args[@]}")"
}

# train_command [KEY=VALUE...]: starts `python -m train CONFIG workdir=WORKDIR DATA KEY=VALUE...
# TRAIN_ARGS` (TRAIN_ARGS last, so they win) in the background of this worker and returns.
# Its output is appended to LOG_DIR/train.log, its pid written to LOG_DIR/train.pid and, when
# it ends, its exit status to LOG_DIR/exit_status. Refuses (exit 1) while a trainer this
# command started is still running.
train_command() {
  local dir venv log args words=()
  read -r dir venv log <<<"$(quote "$REMOTE_DIR" "$REMOTE_VENV" "$LOG_DIR")"
  mapfile -t words < <(trainer_args "$@")
  args=$(quote python -m train "${words[@]}")
  local inner="$args; echo \$? > \"\$CCE_LOG/exit_status\""
  echo "set -euo pipefail; mkdir -p $log; export CCE_LOG=\$(cd $log && pwd);" \
    "if [ -f \"\$CCE_LOG/train.pid\" ] && kill -0 \"\$(cat \"\$CCE_LOG/train.pid\")\" 2>/dev/null;" \
    "then echo \"\$(hostname): a trainer is already running (pid \$(cat \"\$CCE_LOG/train.pid\"))\" >&2; exit 1; fi;" \
    "cd $dir; . $venv/bin/activate; rm -f \"\$CCE_LOG/exit_status\";" \
    "echo \"=== \$(date -u +%FT%TZ) \$(hostname) launching cce_jax \$(git rev-parse --short HEAD)\" >> \"\$CCE_LOG/train.log\";" \
    "nohup bash -c $(quote "$inner") >> \"\$CCE_LOG/train.log\" 2>&1 < /dev/null &" \
    "echo \$! > \"\$CCE_LOG/train.pid\"; echo \"\$(hostname): trainer started, log \$CCE_LOG/train.log\""
}

# status_command: prints one word about this worker's trainer: `running`, `exit:N` (it ended
# with status N), `stopped` (set up, but not running and no exit status: e.g. after a reboot)
# or `fresh` (not set up).
status_command() {
  local dir venv log
  read -r dir venv log <<<"$(quote "$REMOTE_DIR" "$REMOTE_VENV" "$LOG_DIR")"
  echo "if [ -f $log/exit_status ]; then echo exit:\$(cat $log/exit_status);" \
    "elif [ -f $log/train.pid ] && kill -0 \"\$(cat $log/train.pid)\" 2>/dev/null; then echo running;" \
    "elif (cd $dir 2>/dev/null && [ -x $venv/bin/python ]); then echo stopped; else echo fresh; fi"
}
