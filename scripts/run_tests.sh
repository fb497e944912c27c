#!/usr/bin/env bash
# Install everything into a virtual environment and run the whole test suite (what CI runs).
#
#   bash scripts/run_tests.sh            # lint + all tests, real-model tests included
#   bash scripts/run_tests.sh --fast     # skip the tests marked slow (real model / real inference server)
#   bash scripts/run_tests.sh --dry-run  # print the commands instead of running them
#   bash scripts/run_tests.sh -- -k engine   # extra arguments after -- go to pytest
#
# Knobs: VENV (default .venv), PYTHON (interpreter that creates the venv, default python3), SKIP_INSTALL=1,
# SKYRL_TESTS=0 / TALES_TESTS=0 (leave out integrations/skyrl or integrations/nemo_gym_tales: each builds its own
# Python 3.12 environment and reports a skip, with the reason, on a machine without Python 3.12).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
SKYRL_TESTS="${SKYRL_TESTS:-1}"
TALES_TESTS="${TALES_TESTS:-1}"
FAST=0
DRY_RUN=0
PYTEST_EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --fast) FAST=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; PYTEST_EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_tests.sh: unknown option '$1' (valid: --fast --dry-run --help, then -- PYTEST_ARGS)" >&2; exit 2 ;;
  esac
  shift
done

run() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; printf '\n'; else echo "+ $*" >&2; "$@"; fi
}

cd "$ROOT"
if [[ ! -x "$VENV/bin/python" ]]; then
  run "$PYTHON" -m venv "$VENV"
fi
if [[ "$SKIP_INSTALL" != 1 ]]; then
  run env PYTHON="$VENV/bin/python" bash scripts/install.sh --all
fi

run "$VENV/bin/ruff" check .
run "$VENV/bin/ruff" format --check .
mapfile -t SHELL_SCRIPTS < <(git ls-files '*.sh' .ci/run 2>/dev/null || find scripts -name '*.sh')
if [[ ${#SHELL_SCRIPTS[@]} -gt 0 ]]; then
  run "$VENV/bin/shellcheck" -x "${SHELL_SCRIPTS[@]}"
fi

MARKS=()
if [[ "$FAST" == 1 ]]; then
  MARKS=(-m "not slow")
fi
run "$VENV/bin/python" -m pytest "${MARKS[@]}" "${PYTEST_EXTRA[@]}"

# The integrations, each in its own Python >= 3.12 environment (skipped, with the reason, where none exists).
INTEGRATION_FLAGS=()
if [[ "$FAST" == 1 ]]; then INTEGRATION_FLAGS=(--fast); fi
if [[ "$SKYRL_TESTS" == 1 ]]; then
  run bash integrations/skyrl/run_tests.sh "${INTEGRATION_FLAGS[@]}"
fi
if [[ "$TALES_TESTS" == 1 ]]; then
  run env RECIPE_PYTHON="$VENV/bin/python" bash integrations/nemo_gym_tales/run_tests.sh "${INTEGRATION_FLAGS[@]}"
fi
