#!/usr/bin/env bash
# The JAX version matrix: one venv per supported JAX version, each with the Python that version
# needs, the project installed editable from this checkout with its test and train extras, and
# the default test suite run in each. It takes several suites' time (minutes each on a small
# machine), so CI does not run it; run it on request, from the repository root:
#
#   scripts/jax_matrix.sh                        # every version below, default suite
#   scripts/jax_matrix.sh 0.11.2                 # one version
#   scripts/jax_matrix.sh --build-only           # make the venvs, run nothing
#   scripts/jax_matrix.sh 0.12.0.1 -- -x -q tests/test_pallas_gpu.py   # pytest arguments after --
#
# Environment: CCE_JAX_MATRIX_DIR (where the venvs go; default .matrix/ in the checkout, which
# git ignores). A venv is reused when its jax has the wanted version (the suite runs this
# checkout's code either way). Each suite's output goes to DIR/jax-VERSION.log; a summary line
# per version is printed at the end, and the exit status is 0 only when every version built
# and passed.
set -euo pipefail

# The versions tested: the lowest supported, and the newest of each later minor release.
readonly DEFAULT_VERSIONS=(0.10.2 0.11.2 0.12.0.1)

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
}

# The Python minor version a JAX release needs (jax 0.11 dropped Python 3.11).
python_for_jax() {
  case "$1" in
    0.10.*) echo 3.11 ;;
    *) echo 3.12 ;;
  esac
}

# Prints the path of a working pythonX.Y: on PATH first (a pyenv shim counts only if it runs),
# then under pyenv's versions folder. Fails with one line naming the version and the fix.
find_python() {
  local minor="$1" candidate root
  if candidate="$(command -v "python${minor}")" && "${candidate}" -c 'pass' 2>/dev/null; then
    echo "${candidate}"
    return 0
  fi
  root="$(pyenv root 2>/dev/null || echo "${HOME}/.pyenv")"
  for candidate in "${root}"/versions/"${minor}".*/bin/python"${minor}"; do
    if [[ -x "${candidate}" ]] && "${candidate}" -c 'pass' 2>/dev/null; then
      echo "${candidate}"
      return 0
    fi
  done
  echo "jax_matrix: no working python${minor} on PATH or under ${root}/versions;" \
    "install it (e.g. 'pyenv install ${minor}') and rerun" >&2
  return 2
}

# Creates (or reuses) the venv for one JAX version; prints its folder.
build_venv() {
  local version="$1" dir="$2" python venv installed log
  venv="${dir}/jax-${version}"
  if [[ -x "${venv}/bin/python" ]]; then
    installed="$("${venv}/bin/python" -c 'import jax; print(jax.__version__)' 2>/dev/null || true)"
    if [[ "${installed}" == "${version}" ]]; then
      echo "${venv}"
      return 0
    fi
  fi
  python="$(find_python "$(python_for_jax "${version}")")" || return 2
  log="${dir}/jax-${version}.build.log"
  echo "jax_matrix: building ${venv} with ${python} ($("${python}" --version 2>&1))," \
    "pip's output in ${log}" >&2
  rm -rf "${venv}"
  if ! { "${python}" -m venv "${venv}" \
      && "${venv}/bin/python" -m pip install --upgrade pip \
      && "${venv}/bin/python" -m pip install -e ".[test,train]" "jax==${version}" \
        "jaxlib==${version}"; } >"${log}" 2>&1; then
    tail -n 5 "${log}" >&2
    return 1
  fi
  echo "${venv}"
}

main() {
  local versions=() pytest_args=() build_only=0
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -h | --help) usage; return 0 ;;
      --build-only) build_only=1 ;;
      --) shift; pytest_args=("$@"); break ;;
      0.*) versions+=("$1") ;;
      *) echo "jax_matrix: unknown argument '$1'; pass JAX versions (e.g. 0.11.2)," \
           "--build-only, or pytest arguments after --" >&2
         return 2 ;;
    esac
    shift
  done
  [[ ${#versions[@]} -gt 0 ]] || versions=("${DEFAULT_VERSIONS[@]}")
  [[ ${#pytest_args[@]} -gt 0 ]] || pytest_args=(-q)

  cd "$(dirname "$0")/.."
  local dir="${CCE_JAX_MATRIX_DIR:-.matrix}"
  mkdir -p "${dir}"
  dir="$(cd "${dir}" && pwd)"

  local version venv log status=0 summary=()
  for version in "${versions[@]}"; do
    if ! venv="$(build_venv "${version}" "${dir}")"; then
      summary+=("jax ${version}: venv build failed")
      status=1
      continue
    fi
    if [[ ${build_only} -eq 1 ]]; then
      summary+=("jax ${version}: built ${venv}")
      continue
    fi
    log="${dir}/jax-${version}.log"
    echo "jax_matrix: jax ${version}: python -m pytest ${pytest_args[*]} > ${log}" >&2
    # PYTHONPATH: this checkout's code, even where a reused venv's editable install points
    # at another checkout.
    if PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}" "${venv}/bin/python" -m pytest \
        "${pytest_args[@]}" >"${log}" 2>&1; then
      summary+=("jax ${version} ($("${venv}/bin/python" --version 2>&1)): $(tail -n 1 "${log}")")
    else
      summary+=("jax ${version} ($("${venv}/bin/python" --version 2>&1)): FAILED: $(tail -n 1 \
        "${log}") (see ${log})")
      status=1
    fi
  done
  printf '%s\n' "${summary[@]}"
  return "${status}"
}

# Run unless sourced (the tests source the script to call its functions).
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
  exit  # with main's status; bash reads no further (the file may change during a long run)
fi
