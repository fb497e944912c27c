#!/usr/bin/env bash
# Evaluate a checkpoint on tau2 (eval/evaluate_tau2.py), or compare finished result files.
#
#   bash scripts/run_eval.sh [--dry-run] [--help] [-- extra evaluate_tau2.py flags]
#   bash scripts/run_eval.sh [--dry-run] --compare results/base.json results/sft.json results/grpo.json \
#     [tau2_run.json] [-- --output-path results/compare.md]
#
# Extra evaluate_tau2.py flags go after `--`, tau2's spellings included (--task-ids ID1 ID2, --task-split-name,
# --max-concurrency, --user-llm, --save-to). --compare also reads a Results JSON written by `tau2 run`; every run
# writes its own tau2 Results file beside OUTPUT_PATH (<name>.tau2.json, for `tau2 view --file`).
#
# Knobs (environment variables, defaults in brackets):
#   CHECKPOINT     Hugging Face model folder to evaluate               [/root/Qwen3-4B-Instruct-2507]
#   OUTPUT_PATH    results JSON                                        [RESULTS_DIR/<checkpoint name>_<domain>_<split>.json]
#   RESULTS_DIR    folder for the default OUTPUT_PATH                  [<recipe root>/results]
#   DOMAIN         tau2 domain                                         [$TAU2_DOMAIN, else telecom]
#   TASK_SPLIT     task split                                          [test]
#   NUM_TASKS      first N tasks of the split (empty = all; telecom test has 40) []
#   NUM_TRIALS     episodes per task (pass^k needs k <= NUM_TRIALS)    [4]
#   CONCURRENCY    concurrent episodes                                 [evaluate_tau2.py's default]
#   SGLANG_URL     a running policy server (scripts/serve_policy.sh); empty = evaluate_tau2.py starts its own []
#   SGLANG_PORT    port for the server evaluate_tau2.py starts         [30000]
#   EVAL_GPUS      CUDA_VISIBLE_DEVICES for that server (empty = inherit) []
#   SERVER_LAUNCHER  server evaluate_tau2.py starts: sglang, or cpu (scripts/cpu_policy_server.py, no GPU) [sglang]
#   USER_KIND      user simulator: llm, gemini, scripted or solo       [$TAU2_USER_KIND, else llm]
#   USER_MODEL     user simulator model name                           [$TAU2_USER_MODEL]
#   USER_BASE_URL  user simulator OpenAI-compatible /v1 URL (llm)      [$TAU2_USER_BASE_URL]
#   PYTHON         Python interpreter                                  [python3]
#
# Every other TAU2_* setting (TAU2_MAX_STEPS, TAU2_USER_TEMPERATURE, ...) is read by the evaluator from the
# environment as usual. Compare runs only with the same user simulator, domain, split and task count.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# `--compare FILE...` selects the comparison mode; everything else is the common options.
COMPARE_FILES=()
COMMON_ARGS=()
COMPARE=0
while (($# > 0)); do
  case "$1" in
    --compare)
      COMPARE=1
      shift
      while (($# > 0)) && [[ "$1" != -* ]]; do
        COMPARE_FILES+=("$(abs_path "$1")")
        shift
      done
      ;;
    --)
      COMMON_ARGS+=("$@")
      break
      ;;
    *)
      COMMON_ARGS+=("$1")
      shift
      ;;
  esac
done
parse_common_args "${COMMON_ARGS[@]}"

EVAL_SCRIPT="$RECIPE_ROOT/eval/evaluate_tau2.py"
check_file "$EVAL_SCRIPT" "the evaluator" "The recipe checkout at $RECIPE_ROOT is incomplete"

if [[ "$COMPARE" == 1 ]]; then
  ((${#COMPARE_FILES[@]} > 0)) || die "--compare needs one or more result files (from earlier runs of this script)"
  for file in "${COMPARE_FILES[@]}"; do
    check_file "$file" "result file" "Produce it with: CHECKPOINT=... OUTPUT_PATH=$file bash scripts/run_eval.sh"
  done
  finish_input_checks
  run_cd "$RECIPE_ROOT"
  run_cmd "$PYTHON" "$EVAL_SCRIPT" --compare "${COMPARE_FILES[@]}" "${PASSTHROUGH_ARGS[@]}"
  exit 0
fi

CHECKPOINT="${CHECKPOINT:-/root/Qwen3-4B-Instruct-2507}"
CHECKPOINT="$(abs_path "${CHECKPOINT%/}")"
DOMAIN="${DOMAIN:-${TAU2_DOMAIN:-telecom}}"
TASK_SPLIT="${TASK_SPLIT:-test}"
RESULTS_DIR="$(abs_path "${RESULTS_DIR:-$RECIPE_ROOT/results}")"
OUTPUT_PATH="$(abs_path "${OUTPUT_PATH:-$RESULTS_DIR/$(basename "$CHECKPOINT")_${DOMAIN}_${TASK_SPLIT}.json}")"
NUM_TASKS="${NUM_TASKS:-}"
NUM_TRIALS="${NUM_TRIALS:-4}"
CONCURRENCY="${CONCURRENCY:-}"
SGLANG_URL="${SGLANG_URL:-}"
SGLANG_PORT="${SGLANG_PORT:-30000}"
EVAL_GPUS="${EVAL_GPUS:-}"
SERVER_LAUNCHER="${SERVER_LAUNCHER:-sglang}"
USER_KIND="${USER_KIND:-${TAU2_USER_KIND:-llm}}"
USER_MODEL="${USER_MODEL:-${TAU2_USER_MODEL:-}}"
USER_BASE_URL="${USER_BASE_URL:-${TAU2_USER_BASE_URL:-}}"

check_positive_int NUM_TRIALS "$NUM_TRIALS"
check_positive_int SGLANG_PORT "$SGLANG_PORT"
if [[ -n "$CONCURRENCY" ]]; then
  check_positive_int CONCURRENCY "$CONCURRENCY"
fi
if [[ -n "$NUM_TASKS" ]]; then
  check_positive_int NUM_TASKS "$NUM_TASKS"
fi
[[ "$SERVER_LAUNCHER" == sglang || "$SERVER_LAUNCHER" == cpu ]] ||
  die "SERVER_LAUNCHER must be sglang or cpu, got '$SERVER_LAUNCHER'"
if [[ -d "$CHECKPOINT" && ! -f "$CHECKPOINT/config.json" ]] &&
  compgen -G "$CHECKPOINT/iter_*" >/dev/null; then
  input_problem "CHECKPOINT '$CHECKPOINT' is a Megatron save folder; convert it first: CKPT_DIR=$CHECKPOINT bash scripts/convert_megatron_to_hf.sh, then set CHECKPOINT=${CHECKPOINT}_hf"
else
  check_hf_dir "$CHECKPOINT" "CHECKPOINT" \
    "Download the base model or convert a trained one (scripts/convert_megatron_to_hf.sh)"
fi
check_user_simulator "$USER_KIND" "$USER_MODEL" "$USER_BASE_URL"
if [[ -n "$SGLANG_URL" ]]; then
  if is_dry_run; then
    log "note: a real run checks that the policy server answers at ${SGLANG_URL%/}/v1/models"
  elif ! http_ok "${SGLANG_URL%/}/v1/models"; then
    input_problem "no policy server answers at ${SGLANG_URL%/}/v1/models; start it with CHECKPOINT=$CHECKPOINT bash scripts/serve_policy.sh, or unset SGLANG_URL"
  fi
elif [[ "$SERVER_LAUNCHER" == sglang ]]; then
  if [[ -n "$EVAL_GPUS" ]]; then
    require_gpu_ids "$EVAL_GPUS" "the evaluation server (EVAL_GPUS)"
  else
    require_gpus 1 "the evaluation server"
  fi
fi
finish_input_checks

EVAL_ARGS=(
  --checkpoint "$CHECKPOINT"
  --output-path "$OUTPUT_PATH"
  --num-trials "$NUM_TRIALS"
  --domain "$DOMAIN"
  --task-split "$TASK_SPLIT"
  --sglang-port "$SGLANG_PORT"
  --user-kind "$USER_KIND"
  --server-launcher "$SERVER_LAUNCHER"
)
if [[ -n "$NUM_TASKS" ]]; then
  EVAL_ARGS+=(--num-tasks "$NUM_TASKS")
fi
if [[ -n "$SGLANG_URL" ]]; then
  EVAL_ARGS+=(--sglang-url "$SGLANG_URL")
fi
if [[ -n "$CONCURRENCY" ]]; then
  EVAL_ARGS+=(--concurrency "$CONCURRENCY")
fi
if [[ -n "$USER_MODEL" ]]; then
  EVAL_ARGS+=(--user-model "$USER_MODEL")
fi
if [[ -n "$USER_BASE_URL" ]]; then
  EVAL_ARGS+=(--user-base-url "$USER_BASE_URL")
fi
ENV_PREFIX=(env LITELLM_LOCAL_MODEL_COST_MAP=True)
if [[ -n "$EVAL_GPUS" ]]; then
  ENV_PREFIX+=("CUDA_VISIBLE_DEVICES=$EVAL_GPUS")
fi

if ! is_dry_run; then
  mkdir -p "$(dirname "$OUTPUT_PATH")"
fi
run_cd "$RECIPE_ROOT"
run_cmd "${ENV_PREFIX[@]}" "$PYTHON" "$EVAL_SCRIPT" "${EVAL_ARGS[@]}" "${PASSTHROUGH_ARGS[@]}"
if ! is_dry_run; then
  log "results: $OUTPUT_PATH (compare runs with: bash scripts/run_eval.sh --compare A.json B.json ...)"
fi
