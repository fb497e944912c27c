#!/usr/bin/env bash
# Build the TALES server's own environment (Python >= 3.12) if needed and run its tests.
#
#   bash integrations/nemo_gym_tales/run_tests.sh            # all tests (the SmolLM2 one needs the recipe's .venv)
#   bash integrations/nemo_gym_tales/run_tests.sh --fast     # skip the test marked slow (real model)
#   bash integrations/nemo_gym_tales/run_tests.sh --dry-run  # print the commands instead of running them
#   bash integrations/nemo_gym_tales/run_tests.sh -- -k single_turn   # extra arguments after -- go to pytest
#
# Knobs: TALES_VENV (default: this folder's .venv), TALES_PYTHON (see install.sh), SKIP_INSTALL=1,
# RECIPE_PYTHON (the recipe's Python with torch + transformers, for the real-model test; default <repo>/.venv).
# Where no Python >= 3.12 exists, it prints why the tests are skipped and exits 0.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TALES_VENV="${TALES_VENV:-$HERE/.venv}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
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

export TALES_VENV
if [[ ! -x "$TALES_VENV/bin/python" ]] && ! bash "$HERE/install.sh" --find >/dev/null 2>&1; then
  echo "TALES tests SKIPPED: no Python >= 3.12 here for NeMo Gym (set TALES_PYTHON, or e.g. \`pyenv install 3.12\`)" >&2
  exit 0
fi
if [[ "$SKIP_INSTALL" != 1 ]]; then
  INSTALL_ARGS=()
  [[ "$DRY_RUN" == 1 ]] && INSTALL_ARGS+=(--dry-run)
  run bash "$HERE/install.sh" "${INSTALL_ARGS[@]}"
fi

MARKS=()
[[ "$FAST" == 1 ]] && MARKS=(-m "not slow")
cd "$HERE"
run env RECIPE_PYTHON="${RECIPE_PYTHON:-$HERE/../../.venv/bin/python}" \
  "$TALES_VENV/bin/python" -m pytest "${MARKS[@]}" "${PYTEST_EXTRA[@]}"
