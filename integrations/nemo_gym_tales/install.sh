#!/usr/bin/env bash
# Build the TALES resources server's own environment: NeMo Gym 0.4.0 needs Python >= 3.12, the recipe runs on 3.11.
#
#   bash integrations/nemo_gym_tales/install.sh             # find a Python >= 3.12, build .venv, install requirements
#   bash integrations/nemo_gym_tales/install.sh --find      # only print the interpreter it would use (exit 3: none)
#   bash integrations/nemo_gym_tales/install.sh --dry-run   # print the commands instead of running them
#
# Knobs: TALES_PYTHON (interpreter to use; default: the first Python >= 3.12 found on PATH, under pyenv, or in
# /usr/bin and /usr/local/bin), TALES_VENV (default: this folder's .venv), PIP_FLAGS.
# Exit code 3 means no suitable interpreter exists here: install one (e.g. `pyenv install 3.12`) or set TALES_PYTHON.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TALES_PYTHON="${TALES_PYTHON:-}"
TALES_VENV="${TALES_VENV:-$HERE/.venv}"
PIP_FLAGS="${PIP_FLAGS:---disable-pip-version-check --no-input}"
MIN_MINOR=12
DRY_RUN=0
FIND_ONLY=0

for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --find) FIND_ONLY=1 ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (valid: --find --dry-run --help)" >&2; exit 2 ;;
  esac
done

run() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; printf '\n'; else echo "+ $*" >&2; "$@"; fi
}

# True when "$1" runs and is CPython 3.MIN_MINOR or newer (pyenv shims of versions not selected fail here, as wanted).
suitable() {
  "$1" -c "import sys; sys.exit(0 if sys.version_info >= (3, $MIN_MINOR) else 1)" >/dev/null 2>&1
}

find_python() {
  local candidates=() pyenv_root
  if [[ -n "$TALES_PYTHON" ]]; then
    candidates+=("$TALES_PYTHON")
  else
    candidates+=(python3.12 python3.13 python3.14 python3)
    pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    if command -v pyenv >/dev/null 2>&1; then pyenv_root="$(pyenv root)"; fi
    candidates+=("$pyenv_root"/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9])
  fi
  local candidate
  for candidate in "${candidates[@]}"; do
    [[ "$candidate" == *"*"* ]] && continue  # an unmatched glob
    if suitable "$candidate"; then
      command -v "$candidate" 2>/dev/null || echo "$candidate"
      return 0
    fi
  done
  return 1
}

if ! PY="$(find_python)"; then
  if [[ -n "$TALES_PYTHON" ]]; then
    echo "install.sh: TALES_PYTHON='$TALES_PYTHON' is not a working Python >= 3.$MIN_MINOR" >&2
  else
    echo "install.sh: no Python >= 3.$MIN_MINOR found (looked on PATH, under pyenv, in /usr/bin and /usr/local/bin);" \
      "NeMo Gym 0.4.0 needs one: install it (e.g. \`pyenv install 3.12\`) or set TALES_PYTHON=/path/to/python3.12" >&2
  fi
  exit 3
fi
if [[ "$FIND_ONLY" == 1 ]]; then
  echo "$PY"
  exit 0
fi
echo "install.sh: using $PY ($("$PY" --version 2>&1))" >&2

START=$SECONDS
if [[ ! -x "$TALES_VENV/bin/python" ]]; then
  run "$PY" -m venv "$TALES_VENV"
fi
# shellcheck disable=SC2086
run "$TALES_VENV/bin/python" -m pip install $PIP_FLAGS -r "$HERE/requirements.txt"
if [[ "$DRY_RUN" == 0 ]]; then
  "$TALES_VENV/bin/python" -c 'import nemo_gym, textworld, textworld_express, scienceworld, jericho' \
    || { echo "install.sh: the environment at $TALES_VENV does not import its packages" >&2; exit 1; }
  echo "install.sh: $TALES_VENV ready in $((SECONDS - START)) s ($(du -sh "$TALES_VENV" | cut -f1))" >&2
fi
