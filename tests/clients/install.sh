#!/usr/bin/env bash
# Install the published dynamic-sessions client tools that tests/integration/test_client_tools.py
# drives, each into its own virtualenv (their dependency trees clash):
#   /var/cache/shoal/client-venvs/<tool>/   from the pinned tests/clients/<tool>.txt
# A venv is rebuilt only when its requirements file (or the Python it was made with) changed,
# so a second run takes a second. Runs the installs in parallel; one progress line per tool.
#
#   tests/clients/install.sh [tool ...]     (default: every tests/clients/*.txt)
#   SHOAL_CLIENT_VENVS=/elsewhere tests/clients/install.sh
#
# Needs Python >= 3.10 with the venv module: the Python of the repo's .venv when there is one,
# else python3 (on Debian, python3-venv is installed when missing and we are root).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
ROOT=${SHOAL_CLIENT_VENVS:-/var/cache/shoal/client-venvs}

say() { echo "clients: $*"; }

pick_python() {
  local candidate
  if [ -x "$REPO/.venv/bin/python" ]; then
    candidate=$("$REPO/.venv/bin/python" -c 'import sys; print(sys._base_executable)' 2>/dev/null) \
      || candidate=""
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  fi
  command -v python3 || { echo "clients: python3 is required" >&2; return 1; }
}

ensure_venv_module() {
  # Debian's python3 lacks ensurepip until python3-venv is installed.
  local py=$1
  "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
    && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    say "installing python3-venv"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends python3-venv >/dev/null
  fi
  "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || {
    echo "clients: $py needs Python >= 3.10 with venv and ensurepip (apt-get install python3-venv)" >&2
    return 1
  }
}

# The stamp names what a venv was built from: the requirements file and the interpreter.
stamp_of() {
  local req=$1 py=$2
  { sha256sum "$req" | cut -c1-16; "$py" -c 'import sys; print(sys.version)'; } | sha256sum \
    | cut -c1-16
}

install_one() {
  local tool=$1 py=$2 req="$HERE/$1.txt" venv="$ROOT/$1" want start log
  want=$(stamp_of "$req" "$py")
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.shoal-stamp" 2>/dev/null)" = "$want" ] \
    && "$venv/bin/python" -c '' 2>/dev/null; then
    say "$tool up to date ($(du -sh "$venv" | cut -f1))"
    return 0
  fi
  start=$SECONDS
  log="$ROOT/$tool.log"
  say "$tool: installing from tests/clients/$tool.txt ..."
  rm -rf "$venv"
  if ! {
    "$py" -m venv "$venv" \
      && "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  } >"$log" 2>&1; then
    echo "clients: $tool: install FAILED; the last lines of $log:" >&2
    grep -v "^WARNING: Location 'file:" "$log" | tail -n 25 >&2
    return 1
  fi
  echo "$want" >"$venv/.shoal-stamp"
  say "$tool ready in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1))"
}

main() {
  local py tools=() tool pids=() failed=0 i
  if [ $# -gt 0 ]; then
    tools=("$@")
  else
    for req in "$HERE"/*.txt; do tools+=("$(basename "$req" .txt)"); done
  fi
  for tool in "${tools[@]}"; do
    [ -f "$HERE/$tool.txt" ] || { echo "clients: no tests/clients/$tool.txt" >&2; exit 1; }
  done
  py=$(pick_python)
  ensure_venv_module "$py"
  mkdir -p "$ROOT"
  # One install at a time per machine: a second caller waits, then finds the venvs up to date.
  exec 9>"$ROOT/.lock"
  flock 9
  for tool in "${tools[@]}"; do
    install_one "$tool" "$py" &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed=1
  done
  if [ "$failed" -ne 0 ]; then
    echo "clients: some client venvs could not be installed (see above)" >&2
    exit 1
  fi
}

main "$@"
