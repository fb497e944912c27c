#!/usr/bin/env bash
# The SkyRL integration's tests, in its own Python 3.12 environment (install.sh builds it when missing or stale).
#
#   bash integrations/skyrl/run_tests.sh                # every test in integrations/skyrl/tests
#   bash integrations/skyrl/run_tests.sh --fast         # without the real-model test (marked slow)
#   bash integrations/skyrl/run_tests.sh --dry-run      # print the commands instead of running them
#   bash integrations/skyrl/run_tests.sh -- -k gold     # extra arguments after -- go to pytest
#
# On a machine without Python 3.12 it says so, skips the tests and exits 0 (SKYRL_REQUIRED=1 makes that exit 3).
# Knobs: SKYRL_VENV, SKYRL_PYTHON (see install.sh), SKIP_INSTALL=1 (use the environment as it is), SKYRL_REQUIRED.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
export SKYRL_VENV="${SKYRL_VENV:-$HERE/.venv}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
SKYRL_REQUIRED="${SKYRL_REQUIRED:-0}"
FAST=0
DRY_RUN=0
PYTEST_EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --fast) FAST=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --)
      shift
      PYTEST_EXTRA=("$@")
      break
      ;;
    -h | --help)
      awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *)
      echo "run_tests.sh: unknown option '$1' (valid: --fast --dry-run --help, then -- PYTEST_ARGS)" >&2
      exit 2
      ;;
  esac
  shift
done

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    echo "+ $*" >&2
    "$@"
  fi
}

if ! reason="$(bash "$HERE/install.sh" --find-python 2>&1 >/dev/null)"; then
  echo "SKIPPED: SkyRL integration tests: ${reason#install.sh: }" >&2
  [[ "$SKYRL_REQUIRED" == 1 ]] && exit 3
  exit 0
fi

# What the environment was built from: install.sh runs again when any of it changed.
stamp() {
  cat "$HERE/install.sh" "$ROOT/scripts/install.sh" "$ROOT"/requirements*.txt | sha256sum | cut -d' ' -f1
}
STAMP_FILE="$SKYRL_VENV/.installed-from"
if [[ "$SKIP_INSTALL" != 1 ]]; then
  if [[ ! -x "$SKYRL_VENV/bin/python" || "$(cat "$STAMP_FILE" 2>/dev/null)" != "$(stamp)" ]]; then
    run bash "$HERE/install.sh"
    if [[ "$DRY_RUN" == 0 ]]; then stamp >"$STAMP_FILE"; fi
  fi
fi

MARKS=()
if [[ "$FAST" == 1 ]]; then
  MARKS=(-m "not slow")
fi
cd "$ROOT"
run "$SKYRL_VENV/bin/python" -m pytest integrations/skyrl/tests "${MARKS[@]}" "${PYTEST_EXTRA[@]}"
