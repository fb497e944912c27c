# shellcheck shell=bash source-path=SCRIPTDIR
# Shared functions for the launchers in scripts/. Source it after `set -euo pipefail`:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
#   parse_common_args "$@"        # --dry-run, --help, and extra arguments after `--`
#
# Globals it sets: RECIPE_ROOT (repository root), SCRIPT_NAME, DRY_RUN (0/1), PASSTHROUGH_ARGS (array: what came
# after `--`), INPUT_ERRORS (count of problems the check_* functions found), PYTHON (default python3).
#
# Conventions: dry-run commands go to stdout, one per line, shell-quoted so they can be pasted; everything else
# (notes, warnings, errors, the `+ command` trace of a real run) goes to stderr. Values of environment variables whose
# name contains KEY, TOKEN, SECRET or PASSWORD are printed as *** wherever a command is shown ("TOKENS" is a count,
# as in TAU2_MAX_TOKENS_PER_TURN or MAX_TOKENS_PER_GPU, and masks nothing).

RECIPE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SCRIPT_PATH="${BASH_SOURCE[1]:-$0}"
SCRIPT_NAME="$(basename "$SCRIPT_PATH")"
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
INPUT_ERRORS=0
PASSTHROUGH_ARGS=()
RUNTIME_ENV_JSON=""
RUNTIME_ENV_JSON_MASKED=""

# Names of the variables a Ray job must see besides every TAU2_* variable (forwarded only when set and non-empty).
FORWARDED_ENV_NAMES=(OPENAI_API_KEY GEMINI_API_KEY WANDB_API_KEY HF_TOKEN)
SECRET_NAME_PATTERN='KEY|TOKEN|SECRET|PASSWORD'

log() { printf '[%s] %s\n' "$SCRIPT_NAME" "$*" >&2; }
warn() { log "warning: $*"; }
die() {
  log "error: $*"
  exit 1
}

# Print the header comment of the calling script (the lines after the shebang up to the first non-comment line).
print_usage() {
  awk 'NR == 1 && /^#!/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$SCRIPT_PATH"
}

parse_common_args() {
  while (($# > 0)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        print_usage
        exit 0
        ;;
      --)
        shift
        # shellcheck disable=SC2034 # read by the sourcing script
        PASSTHROUGH_ARGS=("$@")
        return 0
        ;;
      *)
        log "unknown option '$1' (valid: --dry-run, --help, and extra arguments after --)"
        exit 2
        ;;
    esac
    shift
  done
}

is_dry_run() { [[ "$DRY_RUN" == 1 ]]; }

is_secret_name() {
  local name="${1^^}"
  name="${name//TOKENS/}"
  [[ "$name" =~ $SECRET_NAME_PATTERN ]]
}

# Values of the secret variables in the environment, NUL-separated, longest first (a value that contains another
# secret is masked whole).
secret_values() {
  local name value
  while IFS= read -r name; do
    value="${!name-}"
    if is_secret_name "$name" && [[ -n "$value" ]]; then
      printf '%s\t%s\0' "${#value}" "$value"
    fi
  done < <(compgen -e) | sort -z -t $'\t' -k1,1 -rn | cut -z -f2-
}

# One shell-quoted line for a command, secrets masked (and the real runtime-env JSON shown in its masked form).
format_cmd() {
  local -a secrets=()
  local arg value quoted out=""
  mapfile -d '' -t secrets < <(secret_values)
  for arg in "$@"; do
    if [[ -n "$RUNTIME_ENV_JSON" && "$arg" == *"$RUNTIME_ENV_JSON"* ]]; then
      arg="${arg//"$RUNTIME_ENV_JSON"/"$RUNTIME_ENV_JSON_MASKED"}"
    fi
    for value in "${secrets[@]}"; do
      arg="${arg//"$value"/"***"}"
    done
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      quoted="$arg"
    elif [[ "$arg" != *"'"* ]]; then
      quoted="'$arg'"
    else
      printf -v quoted '%q' "$arg"
    fi
    out+="$quoted "
  done
  printf '%s' "${out% }"
}

# Dry run: print the command to stdout. Real run: trace it (masked) to stderr, then run it.
run_cmd() {
  if is_dry_run; then
    printf '%s\n' "$(format_cmd "$@")"
  else
    log "+ $(format_cmd "$@")"
    "$@"
  fi
}

# `cd` that a dry run prints instead of performing (the directory may not exist on the machine doing the dry run).
run_cd() {
  if is_dry_run; then
    printf 'cd %q\n' "$1"
  else
    log "+ cd $1"
    cd "$1" || die "cannot cd to '$1'"
  fi
}

# Record a missing or invalid input: a warning in a dry run, an error otherwise (finish_input_checks exits).
input_problem() {
  INPUT_ERRORS=$((INPUT_ERRORS + 1))
  if is_dry_run; then
    warn "$* (a real run stops here)"
  else
    log "error: $*"
  fi
}

# check_dir PATH WHAT HINT / check_file PATH WHAT HINT: HINT says how to create the missing input.
check_dir() {
  [[ -d "$1" ]] || input_problem "$2 not found: '$1'. $3"
}
check_file() {
  [[ -f "$1" ]] || input_problem "$2 not found: '$1'. $3"
}
check_nonempty_file() {
  if [[ ! -f "$1" ]]; then
    input_problem "$2 not found: '$1'. $3"
  elif [[ ! -s "$1" ]]; then
    input_problem "$2 is empty: '$1'. $3"
  fi
}
check_command() {
  command -v "$1" >/dev/null 2>&1 || input_problem "command '$1' not found on PATH. $2"
}
# A Hugging Face model folder: config.json and at least one weight file.
check_hf_dir() {
  local dir="$1" what="$2" hint="$3"
  if [[ ! -f "$dir/config.json" ]]; then
    input_problem "$what (a Hugging Face folder with config.json) not found: '$dir'. $hint"
  elif ! compgen -G "$dir/*.safetensors" >/dev/null && ! compgen -G "$dir/*.bin" >/dev/null; then
    input_problem "$what has config.json but no *.safetensors / *.bin weights: '$dir'. $hint"
  fi
}
# A Megatron torch_dist save folder: latest_checkpointed_iteration.txt beside iter_* / release folders.
check_megatron_dir() {
  [[ -f "$1/latest_checkpointed_iteration.txt" ]] ||
    input_problem "$2 (a Megatron checkpoint folder with latest_checkpointed_iteration.txt) not found: '$1'. $3"
}
# A malformed knob is a usage error even in a dry run: no command can be formed from it.
check_positive_int() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}
check_flag01() {
  [[ "$2" == 0 || "$2" == 1 ]] || die "$1 must be 0 or 1, got '$2'"
}
check_divisible() { # NAME_A VALUE_A NAME_B VALUE_B: A must be a multiple of B
  if [[ "$2" =~ ^[0-9]+$ && "$4" =~ ^[1-9][0-9]*$ ]] && (($2 % $4 != 0)); then
    input_problem "$1 ($2) must be a multiple of $3 ($4)"
  fi
}

finish_input_checks() {
  if ((INPUT_ERRORS > 0)); then
    if is_dry_run; then
      warn "$INPUT_ERRORS input problem(s) listed above; the commands below are what a run would execute"
    else
      die "$INPUT_ERRORS input problem(s) listed above; fix them (or use --dry-run to see the commands without running)"
    fi
  fi
}

# Number of GPUs this process may use: nvidia-smi's list, narrowed by CUDA_VISIBLE_DEVICES when that is set.
visible_gpu_count() {
  local total
  total="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    local listed
    listed="$(printf '%s' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)"
    if ((listed < total)); then total="$listed"; fi
  fi
  printf '%s' "${total:-0}"
}

# require_gpus N WHAT: counted with nvidia-smi in a real run; skipped (noted) in a dry run.
require_gpus() {
  local needed="$1" what="$2" have
  if is_dry_run; then
    log "note: a real run checks with nvidia-smi that $needed GPU(s) are visible for $what"
    return 0
  fi
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    input_problem "nvidia-smi not found: $what needs $needed NVIDIA GPU(s); run this inside slime's GPU container"
    return 0
  fi
  have="$(visible_gpu_count)"
  if ((have < needed)); then
    input_problem "$what needs $needed GPU(s) but $have are visible (nvidia-smi -L, CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES:-}'); lower the GPU knobs or free GPUs"
  fi
}

# require_gpu_ids "0,1" WHAT: every listed index exists (real run only).
require_gpu_ids() {
  local ids="$1" what="$2" total id
  if ! [[ "$ids" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    input_problem "$what: GPU list must look like 0 or 2,3, got '$ids'"
    return 0
  fi
  if is_dry_run; then
    log "note: a real run checks with nvidia-smi that GPU(s) $ids exist for $what"
    return 0
  fi
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    input_problem "nvidia-smi not found: $what needs GPU(s) $ids; run this inside slime's GPU container"
    return 0
  fi
  total="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  for id in ${ids//,/ }; do
    ((id < total)) || input_problem "$what: GPU $id does not exist (nvidia-smi lists $total GPU(s))"
  done
}

# The recipe's Python entry points and plugins must be importable from RECIPE_ROOT.
check_recipe_module() {
  local rel="$1" hint="$2"
  check_file "$RECIPE_ROOT/$rel" "recipe module" "$hint"
}

# GET URL with a short timeout; success when the server answers 2xx. The optional bearer token is read from the
# environment variable named by $2 inside Python, so it never appears on a command line.
http_ok() {
  "$PYTHON" - "$1" "${2:-}" <<'PY'
import os
import sys
import urllib.request

url, key_var = sys.argv[1], sys.argv[2]
request = urllib.request.Request(url)
if key_var and os.environ.get(key_var):
    request.add_header("Authorization", f"Bearer {os.environ[key_var]}")
try:
    with urllib.request.urlopen(request, timeout=5) as response:
        sys.exit(0 if 200 <= response.status < 300 else 1)
except Exception:
    sys.exit(1)
PY
}

# check_user_simulator KIND MODEL BASE_URL: the user simulator the recipe will call (kind llm|gemini|scripted|solo,
# read by rollout/user_sim.py) has its settings, and an OpenAI-compatible server answers (real run only).
# Empty arguments fall back to TAU2_USER_KIND / TAU2_USER_MODEL / TAU2_USER_BASE_URL; the kind then to "scripted",
# the rollout's own default.
check_user_simulator() {
  local kind="${1:-${TAU2_USER_KIND:-scripted}}" model="${2:-${TAU2_USER_MODEL:-}}" base="${3:-${TAU2_USER_BASE_URL:-}}"
  case "$kind" in
    llm)
      if [[ -z "$base" ]]; then
        input_problem "user simulator kind llm needs TAU2_USER_BASE_URL (an OpenAI-compatible /v1 endpoint): start one with scripts/serve_user_sim.sh and export what it prints, or use TAU2_USER_KIND=gemini|scripted|solo"
      fi
      if [[ -z "$model" ]]; then
        input_problem "user simulator kind llm needs TAU2_USER_MODEL (the served model name; scripts/serve_user_sim.sh prints it)"
      fi
      if [[ -n "$base" ]]; then
        if is_dry_run; then
          log "note: a real run checks that the user simulator answers at ${base%/}/models"
        elif ! http_ok "${base%/}/models" TAU2_USER_API_KEY; then
          input_problem "the user simulator does not answer at ${base%/}/models; start it (bash scripts/serve_user_sim.sh) or fix TAU2_USER_BASE_URL"
        fi
      fi
      ;;
    gemini)
      if [[ -z "$model" ]]; then
        input_problem "user simulator kind gemini needs TAU2_USER_MODEL (e.g. gemini-2.5-flash)"
      fi
      if [[ -z "${GEMINI_API_KEY:-}" && -z "${TAU2_USER_API_KEY:-}" ]]; then
        input_problem "user simulator kind gemini needs GEMINI_API_KEY (or TAU2_USER_API_KEY) in the environment"
      fi
      ;;
    scripted)
      warn "the user simulator is the scripted customer (TAU2_USER_KIND=${TAU2_USER_KIND:-unset}): it performs the gold phone actions when asked, with no LLM; for real training and evaluation start scripts/serve_user_sim.sh and export TAU2_USER_*"
      ;;
    solo) ;;
    *) input_problem "user simulator kind must be llm, gemini, scripted or solo, got '$kind'" ;;
  esac
}

# Build RUNTIME_ENV_JSON (real values) and RUNTIME_ENV_JSON_MASKED (secrets as ***) for `ray job submit`.
# Arguments: NAME=VALUE pairs set explicitly (non-secret: PYTHONPATH, ...). Then every TAU2_* variable, the
# FORWARDED_ENV_NAMES and the names in FORWARD_ENV (space separated) are copied from the environment when set.
# Values are read by Python from os.environ and serialized with json.dumps, never spliced into a string.
build_runtime_env() {
  local -a names=("${FORWARDED_ENV_NAMES[@]}")
  local extra
  # shellcheck disable=SC2206 # FORWARD_ENV is a space-separated list of names
  extra=(${FORWARD_ENV:-})
  names+=("${extra[@]}")
  RUNTIME_ENV_JSON="$(_runtime_env_json real "${names[*]}" "$@")"
  RUNTIME_ENV_JSON_MASKED="$(_runtime_env_json masked "${names[*]}" "$@")"
}

_runtime_env_json() {
  "$PYTHON" - "$@" <<'PY'
import json
import os
import re
import sys

mode, forwarded, pairs = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
env_vars = {}
for pair in pairs:
    name, _, value = pair.partition("=")
    env_vars[name] = value
names = sorted(name for name in os.environ if name.startswith("TAU2_")) + forwarded
for name in names:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        sys.exit(f"FORWARD_ENV: '{name}' is not a variable name")
    value = os.environ.get(name, "")
    if value != "" or name.startswith("TAU2_"):
        env_vars[name] = value
if mode == "masked":
    secret = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
    env_vars = {
        name: "***" if secret.search(name.upper().replace("TOKENS", "")) and value else value
        for name, value in env_vars.items()
    }
print(json.dumps({"env_vars": env_vars}, sort_keys=True))
PY
}

# Names (not values) of what build_runtime_env forwards from the environment, for the log.
forwarded_env_summary() {
  "$PYTHON" -c 'import json, sys; print(" ".join(sorted(json.loads(sys.argv[1])["env_vars"])))' "$RUNTIME_ENV_JSON_MASKED"
}

# `ray start` for a single-node head unless one is already up or RAY_START=0.
start_ray_head() {
  local num_gpus="$1"
  if [[ "${RAY_START:-1}" == 0 ]]; then
    log "RAY_START=0: using the Ray cluster at ${RAY_ADDRESS_URL}"
    return 0
  fi
  if ! is_dry_run && ray status >/dev/null 2>&1; then
    log "a Ray cluster is already running; reusing it (ray stop first to start one with $num_gpus GPU(s))"
    return 0
  fi
  run_cmd ray start --head --node-ip-address "${MASTER_ADDR:-127.0.0.1}" --num-gpus "$num_gpus" \
    --disable-usage-stats --dashboard-host=127.0.0.1 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}"
}

# Absolute path without requiring it to exist.
abs_path() {
  case "$1" in
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

# Fill MODEL_ARGS from scripts/models/<name>.sh.
load_model_args() {
  local file="$RECIPE_ROOT/scripts/models/$1.sh"
  [[ -f "$file" ]] || die "model config '$file' not found (MODEL_NAME=$1); add scripts/models/$1.sh with a MODEL_ARGS array"
  # shellcheck source=../models/qwen3-4B-Instruct-2507.sh
  source "$file"
}
