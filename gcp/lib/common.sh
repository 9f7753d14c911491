# shellcheck shell=bash
# Sourced by every gcp/ script: flag parsing, the env file, and running (or, under --dry-run,
# printing) commands. Progress messages go to stderr, so that under --dry-run stdout holds
# nothing but the commands, one per line, each quoted so that a shell can run it as printed.

GCP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_ROOT=$(cd "$GCP_DIR/.." && pwd)
DRY_RUN=0
ENV_FILE=${CCE_GCP_ENV:-$GCP_DIR/env}
ARGS=()

die() {
  echo "error: $*" >&2
  exit 1
}

note() {
  echo "$(basename "$0"): $*" >&2
}

# parse_common_args "$@": --help (prints usage and exits), --dry-run, --env FILE; every other
# argument is left, in order, in the array ARGS. Each script defines usage().
parse_common_args() {
  ARGS=()
  while (($#)); do
    case $1 in
      -h | --help)
        usage
        exit 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      --env)
        (($# >= 2)) || die "--env needs a file"
        ENV_FILE=$2
        shift
        ;;
      --env=*) ENV_FILE=${1#--env=} ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# common_flags_help: the flags every script's --help lists.
common_flags_help() {
  cat <<'HELP'
  --env FILE   the settings (default: $CCE_GCP_ENV, else gcp/env; template: gcp/env.example)
  --dry-run    print the exact commands instead of running them
  -h, --help   this text
HELP
}

# load_env: sources ENV_FILE, then fills in the defaults of everything optional.
load_env() {
  [[ -f $ENV_FILE ]] || die "no env file at $ENV_FILE: copy gcp/env.example there and fill it in, or pass --env FILE"
  # shellcheck source=/dev/null
  source "$ENV_FILE"
  : "${CAPACITY:=on-demand}"
  : "${QUEUED:=true}"
  : "${QR_NAME:=${TPU_NAME:-}-qr}"
  : "${RUN_NAME:=${TPU_NAME:-run}}"
  : "${CONFIG:=configs/llama3_8b_v5p32.yaml}"
  : "${PREFLIGHT:=true}"
  : "${TRAIN_ARGS:=}"
  : "${REMOTE_DIR:=cce_jax}"
  : "${REMOTE_VENV:=.venv}"
  : "${LOG_DIR:=cce_jax_logs}"
  : "${PYTHON:=python3.11}"
  : "${JAX_INSTALL:=jax[tpu]}"
  : "${POLL_SECONDS:=60}"
  : "${MAX_RECREATES:=20}"
  if [[ -z ${REPO_URL:-} ]]; then
    REPO_URL=$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null || true)
  fi
  if [[ -z ${REPO_COMMIT:-} ]]; then
    REPO_COMMIT=$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null || true)
  fi
  if [[ -z ${WORKDIR:-} && -n ${BUCKET:-} ]]; then
    WORKDIR=${BUCKET%/}/runs/$RUN_NAME
  fi
  case $CAPACITY in
    spot | reserved | on-demand) ;;
    *) die "CAPACITY must be spot, reserved or on-demand, not '$CAPACITY'" ;;
  esac
  case $QUEUED in
    true | false) ;;
    *) die "QUEUED must be true or false, not '$QUEUED'" ;;
  esac
  case $PREFLIGHT in
    true | false) ;;
    *) die "PREFLIGHT must be true or false, not '$PREFLIGHT'" ;;
  esac
  [[ $POLL_SECONDS =~ ^[0-9]+$ ]] || die "POLL_SECONDS must be a whole number of seconds, not '$POLL_SECONDS'"
  [[ $MAX_RECREATES =~ ^[0-9]+$ ]] || die "MAX_RECREATES must be a whole number, not '$MAX_RECREATES'"
}

# require NAME...: dies naming every one of the variables that is empty or unset.
require() {
  local name missing=()
  for name in "$@"; do
    [[ -n ${!name:-} ]] || missing+=("$name")
  done
  ((${#missing[@]} == 0)) || die "missing required setting(s) ${missing[*]} (set them in $ENV_FILE)"
}

# require_workdir: WORKDIR, or BUCKET (a gs:// URL) to derive it from.
require_workdir() {
  if [[ -n ${BUCKET:-} && $BUCKET != gs://* ]]; then
    die "BUCKET must be a gs:// URL, not '$BUCKET'"
  fi
  [[ -n ${WORKDIR:-} ]] || die "missing required setting BUCKET (or WORKDIR) (set it in $ENV_FILE)"
}

# quote ARG...: the arguments joined by spaces, each shell-quoted only where it needs it (in
# single quotes), so that a shell reads them back as the same words.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$arg")
    else
      out+=("${arg@Q}")
    fi
  done
  echo "${out[*]}"
}

# run CMD ARG...: runs the command, or under --dry-run prints it (quoted as by quote) on stdout.
run() {
  if ((DRY_RUN)); then
    quote "$@"
  else
    "$@"
  fi
}

# confirm QUESTION: asks on the terminal; dies unless the answer is y or yes.
confirm() {
  local answer
  read -r -p "$1 [y/N] " answer || true
  [[ $answer =~ ^[Yy]([Ee][Ss])?$ ]] || die "not confirmed; nothing done"
}
