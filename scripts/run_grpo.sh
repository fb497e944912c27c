#!/usr/bin/env bash
# GRPO on tau2 with slime: the recipe's token-in-token-out rollout (rollout.generate_with_tau.generate) plays each
# task against the user simulator; reward.tau2_reward_shaping.tau2_reward_post_process shapes and group-normalizes.
#
#   bash scripts/run_grpo.sh [--dry-run] [--help] [-- extra train.py flags]
#
# Knobs (environment variables, defaults in brackets; hyper-parameters follow the slime tau2 cookbook):
#   PROMPT_DATA          tasks jsonl from examples/tau2_mock.py       [/root/tau2_data/telecom_train_tasks.jsonl]
#   HF_CHECKPOINT        HF model sglang starts from (the SFT model, converted) [/root/Qwen3-4B-Instruct-2507_sft_telecom_hf]
#   REF_LOAD             Megatron checkpoint: KL reference and start point [/root/Qwen3-4B-Instruct-2507_sft_telecom]
#   SAVE_DIR             --save and --load: a rerun resumes from here [/root/Qwen3-4B-Instruct-2507_grpo_telecom]
#   SAVE_INTERVAL        save every N rollouts                        [10]
#   MODEL_NAME           scripts/models/NAME.sh with MODEL_ARGS       [qwen3-4B-Instruct-2507]
#   ACTOR_GPUS           training GPUs                                [4]
#   COLOCATE             1 = sglang shares the training GPUs (offloaded in turn); 0 = separate GPUs [1]
#   ROLLOUT_GPUS         sglang GPUs                                  [ACTOR_GPUS if COLOCATE=1, else 4]
#   ROLLOUT_GPUS_PER_ENGINE  GPUs per sglang engine                   [1]
#   TP                   tensor parallel size (with sequence parallel when > 1) [2]
#   ASYNC                1 = train_async.py (needs COLOCATE=0)        [0]
#   NUM_ROLLOUT          rollouts (training steps of the outer loop)  [100]
#   ROLLOUT_BATCH_SIZE   tasks per rollout                            [16]
#   N_SAMPLES_PER_PROMPT episodes per task (the GRPO group)           [4]
#   GLOBAL_BATCH_SIZE    episodes per optimizer step                  [64]
#   MAX_RESPONSE_LEN     no longer read (a run stops with an error): use EPISODE_MAX_TOKENS / MAX_TOKENS_PER_TURN
#   EPISODE_MAX_TOKENS   token budget of a whole episode's response: sampled turns, tool results and user turns
#                        (--rollout-max-response-len and --eval-max-response-len); at it the episode ends
#                        TRUNCATED [12288: measured, see rollout/budgets.py]
#   MAX_TOKENS_PER_TURN  cap on one policy turn (TAU2_MAX_TOKENS_PER_TURN; 0: none) [1024]
#   MAX_CONTEXT_LEN      prompt + response of an episode (--rollout-max-context-len) [20480]
#   TURN_TIMEOUT_S       bound on one policy or user-simulator turn, retries included (TAU2_TURN_TIMEOUT_S)
#                        [derived: 120 + MAX_TOKENS_PER_TURN / 16 = 184]
#   EPISODE_TIMEOUT_S    bound on one episode (TAU2_EPISODE_TIMEOUT_S) [derived: EPISODE_MAX_TOKENS / 10 = 1229]
#   TEMPERATURE          sampling temperature                         [0.7]
#   LR                   learning rate, constant                      [1e-6]
#   EPS_CLIP / EPS_CLIP_HIGH  PPO clip range                          [0.2 / 0.28]
#   KL_LOSS_COEF         low_var_kl loss coefficient                  [0.01]
#   ENTROPY_COEF         entropy bonus                                [0.001]
#   MAX_TOKENS_PER_GPU   dynamic batching budget per GPU              [20480]
#   SGLANG_MEM_FRACTION  sglang --mem-fraction-static                 [0.7]
#   SGLANG_SERVER_CONCURRENCY  concurrent episodes per engine (lower it for a rate-limited user simulator) [slime's]
#   EVAL_PROMPT_DATA     in-training evaluation tasks (test split)    [/root/tau2_data/telecom_test_tasks.jsonl]
#   EVAL_INTERVAL        evaluate every N rollouts (and before training); 0 = never [10]
#   EVAL_TEMPERATURE     evaluation sampling temperature, as the evaluator's default [0.0]
#   N_SAMPLES_PER_EVAL_PROMPT  episodes per evaluation task         [1]
#   DYNAMIC_SAMPLING     1 = drop groups whose shaped reward is constant (reward.dynamic_filter, with fallback)
#                        and over-sample to replace them              [0]
#   OVER_SAMPLING_BATCH_SIZE  tasks started per rollout with DYNAMIC_SAMPLING=1 [ROLLOUT_BATCH_SIZE * 3 / 2]
#   WANDB_PROJECT        set to log to W&B (--use-wandb); WANDB_GROUP [unset / tau2-grpo]; key from WANDB_API_KEY
#   SLIME_DIR / MEGATRON_DIR   checkouts                              [/root/slime / /root/Megatron-LM]
#   RAY_START            0 = do not start Ray (use a running cluster) [1]
#   RAY_DASHBOARD_PORT   Ray dashboard / job API port                 [8265]
#   RAY_ADDRESS_URL      job API address for `ray job submit`         [http://127.0.0.1:${RAY_DASHBOARD_PORT}]
#   MASTER_ADDR          node IP for `ray start --head`               [127.0.0.1]
#   FORWARD_ENV          extra variable names to pass to the Ray job  []
#
# The recipe's own settings are TAU2_* variables (TAU2_USER_KIND, TAU2_USER_MODEL, TAU2_USER_BASE_URL,
# TAU2_MAX_STEPS, TAU2_REWARD_ALPHA, ...): every one set in this shell is forwarded to the Ray job, with
# OPENAI_API_KEY, GEMINI_API_KEY, WANDB_API_KEY, HF_TOKEN when set (values of secrets are printed as ***).
# TAU2_POLICY_URL is ignored by the rollout (episodes go to slime's sglang router) unless TAU2_POLICY_URL_OVERRIDE=1.
# A local user simulator: bash scripts/serve_user_sim.sh on GPUs that training does not use.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
parse_common_args "$@"

PROMPT_DATA="$(abs_path "${PROMPT_DATA:-/root/tau2_data/telecom_train_tasks.jsonl}")"
HF_CHECKPOINT="$(abs_path "${HF_CHECKPOINT:-/root/Qwen3-4B-Instruct-2507_sft_telecom_hf}")"
REF_LOAD="$(abs_path "${REF_LOAD:-/root/Qwen3-4B-Instruct-2507_sft_telecom}")"
SAVE_DIR="$(abs_path "${SAVE_DIR:-/root/Qwen3-4B-Instruct-2507_grpo_telecom}")"
SAVE_INTERVAL="${SAVE_INTERVAL:-10}"
MODEL_NAME="${MODEL_NAME:-qwen3-4B-Instruct-2507}"
ACTOR_GPUS="${ACTOR_GPUS:-4}"
COLOCATE="${COLOCATE:-1}"
if [[ "$COLOCATE" == 1 ]]; then
  ROLLOUT_GPUS="${ROLLOUT_GPUS:-$ACTOR_GPUS}"
else
  ROLLOUT_GPUS="${ROLLOUT_GPUS:-4}"
fi
ROLLOUT_GPUS_PER_ENGINE="${ROLLOUT_GPUS_PER_ENGINE:-1}"
TP="${TP:-2}"
ASYNC="${ASYNC:-0}"
NUM_ROLLOUT="${NUM_ROLLOUT:-100}"
ROLLOUT_BATCH_SIZE="${ROLLOUT_BATCH_SIZE:-16}"
N_SAMPLES_PER_PROMPT="${N_SAMPLES_PER_PROMPT:-4}"
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-64}"
if [[ -n "${MAX_RESPONSE_LEN:-}" ]]; then
  die "MAX_RESPONSE_LEN is no longer read: it became slime's --rollout-max-response-len, the budget of a whole episode, not of a turn. Set EPISODE_MAX_TOKENS (whole episode) and/or MAX_TOKENS_PER_TURN (one policy turn) instead"
fi
EPISODE_MAX_TOKENS="${EPISODE_MAX_TOKENS:-12288}"
MAX_TOKENS_PER_TURN="${MAX_TOKENS_PER_TURN:-1024}"
MAX_CONTEXT_LEN="${MAX_CONTEXT_LEN:-20480}"
TURN_TIMEOUT_S="${TURN_TIMEOUT_S:-}"
EPISODE_TIMEOUT_S="${EPISODE_TIMEOUT_S:-}"
TEMPERATURE="${TEMPERATURE:-0.7}"
LR="${LR:-1e-6}"
EPS_CLIP="${EPS_CLIP:-0.2}"
EPS_CLIP_HIGH="${EPS_CLIP_HIGH:-0.28}"
KL_LOSS_COEF="${KL_LOSS_COEF:-0.01}"
ENTROPY_COEF="${ENTROPY_COEF:-0.001}"
MAX_TOKENS_PER_GPU="${MAX_TOKENS_PER_GPU:-20480}"
SGLANG_MEM_FRACTION="${SGLANG_MEM_FRACTION:-0.7}"
SGLANG_SERVER_CONCURRENCY="${SGLANG_SERVER_CONCURRENCY:-}"
EVAL_PROMPT_DATA="$(abs_path "${EVAL_PROMPT_DATA:-/root/tau2_data/telecom_test_tasks.jsonl}")"
EVAL_INTERVAL="${EVAL_INTERVAL:-10}"
EVAL_TEMPERATURE="${EVAL_TEMPERATURE:-0.0}"
N_SAMPLES_PER_EVAL_PROMPT="${N_SAMPLES_PER_EVAL_PROMPT:-1}"
DYNAMIC_SAMPLING="${DYNAMIC_SAMPLING:-0}"
WANDB_PROJECT="${WANDB_PROJECT:-}"
WANDB_GROUP="${WANDB_GROUP:-tau2-grpo}"
SLIME_DIR="$(abs_path "${SLIME_DIR:-/root/slime}")"
MEGATRON_DIR="$(abs_path "${MEGATRON_DIR:-/root/Megatron-LM}")"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
RAY_ADDRESS_URL="${RAY_ADDRESS_URL:-http://127.0.0.1:${RAY_DASHBOARD_PORT}}"

if [[ "$ASYNC" == 1 ]]; then
  TRAIN_SCRIPT="$SLIME_DIR/train_async.py"
else
  TRAIN_SCRIPT="$SLIME_DIR/train.py"
fi

load_model_args "$MODEL_NAME"

# --- inputs ---
check_nonempty_file "$PROMPT_DATA" "PROMPT_DATA" \
  "Make it with: python examples/tau2_mock.py --local_dir $(dirname "$PROMPT_DATA") --domains telecom"
check_hf_dir "$HF_CHECKPOINT" "HF_CHECKPOINT" \
  "Convert the SFT checkpoint first: CKPT_DIR=$REF_LOAD OUTPUT_DIR=$HF_CHECKPOINT bash scripts/convert_megatron_to_hf.sh"
check_megatron_dir "$REF_LOAD" "REF_LOAD" \
  "Train SFT first (bash scripts/run_sft.sh), or point REF_LOAD at a torch_dist folder from scripts/convert_hf_to_megatron.sh"
check_file "$TRAIN_SCRIPT" "slime's $(basename "$TRAIN_SCRIPT")" "Set SLIME_DIR to your slime checkout"
check_dir "$MEGATRON_DIR" "MEGATRON_DIR" "Set MEGATRON_DIR to your Megatron-LM checkout"
check_recipe_module rollout/generate_with_tau.py "The recipe checkout at $RECIPE_ROOT is incomplete"
check_recipe_module reward/tau2_reward_shaping.py "The recipe checkout at $RECIPE_ROOT is incomplete"
for knob in ACTOR_GPUS ROLLOUT_GPUS ROLLOUT_GPUS_PER_ENGINE TP NUM_ROLLOUT ROLLOUT_BATCH_SIZE N_SAMPLES_PER_PROMPT \
  GLOBAL_BATCH_SIZE EPISODE_MAX_TOKENS MAX_CONTEXT_LEN MAX_TOKENS_PER_GPU SAVE_INTERVAL N_SAMPLES_PER_EVAL_PROMPT; do
  check_positive_int "$knob" "${!knob}"
done
[[ "$MAX_TOKENS_PER_TURN" =~ ^[0-9]+$ ]] || die "MAX_TOKENS_PER_TURN must be a non-negative integer (0: no cap), got '$MAX_TOKENS_PER_TURN'"
[[ "$EVAL_INTERVAL" =~ ^[0-9]+$ ]] || die "EVAL_INTERVAL must be a non-negative integer (0: no evaluation), got '$EVAL_INTERVAL'"
for knob in TURN_TIMEOUT_S EPISODE_TIMEOUT_S; do
  if [[ -n "${!knob}" && ! "${!knob}" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    die "$knob must be a number of seconds (empty: derived from the token budgets), got '${!knob}'"
  fi
done
if ((EPISODE_MAX_TOKENS >= MAX_CONTEXT_LEN)); then
  input_problem "EPISODE_MAX_TOKENS ($EPISODE_MAX_TOKENS) must be below MAX_CONTEXT_LEN ($MAX_CONTEXT_LEN): the ~7.2k-token prompt needs room"
fi
check_flag01 DYNAMIC_SAMPLING "$DYNAMIC_SAMPLING"
OVER_SAMPLING_BATCH_SIZE="${OVER_SAMPLING_BATCH_SIZE:-$(((ROLLOUT_BATCH_SIZE * 3 + 1) / 2))}"
check_positive_int OVER_SAMPLING_BATCH_SIZE "$OVER_SAMPLING_BATCH_SIZE"
if ((OVER_SAMPLING_BATCH_SIZE < ROLLOUT_BATCH_SIZE)); then
  input_problem "OVER_SAMPLING_BATCH_SIZE ($OVER_SAMPLING_BATCH_SIZE) must be at least ROLLOUT_BATCH_SIZE ($ROLLOUT_BATCH_SIZE)"
fi
if ((EVAL_INTERVAL > 0)); then
  check_nonempty_file "$EVAL_PROMPT_DATA" "EVAL_PROMPT_DATA" \
    "Make it with: python examples/tau2_mock.py --local_dir $(dirname "$EVAL_PROMPT_DATA") --domains telecom --splits train,test (or EVAL_INTERVAL=0)"
fi
if [[ -n "${TAU2_POLICY_URL:-}" && "${TAU2_POLICY_URL_OVERRIDE:-0}" != 1 ]]; then
  warn "TAU2_POLICY_URL=$TAU2_POLICY_URL is set but the rollout ignores it (episodes go to slime's sglang router); TAU2_POLICY_URL_OVERRIDE=1 would send them there instead"
fi
if [[ -n "$SGLANG_SERVER_CONCURRENCY" ]]; then
  check_positive_int SGLANG_SERVER_CONCURRENCY "$SGLANG_SERVER_CONCURRENCY"
fi
check_flag01 COLOCATE "$COLOCATE"
check_flag01 ASYNC "$ASYNC"
if [[ "$ASYNC" == 1 && "$COLOCATE" == 1 ]]; then
  input_problem "ASYNC=1 (train_async.py) overlaps rollout and training, so it needs COLOCATE=0 and separate ROLLOUT_GPUS"
fi
check_divisible ACTOR_GPUS "$ACTOR_GPUS" TP "$TP"
check_divisible ROLLOUT_GPUS "$ROLLOUT_GPUS" ROLLOUT_GPUS_PER_ENGINE "$ROLLOUT_GPUS_PER_ENGINE"
if [[ "$ACTOR_GPUS" =~ ^[1-9][0-9]*$ && "$TP" =~ ^[1-9][0-9]*$ ]]; then
  check_divisible GLOBAL_BATCH_SIZE "$GLOBAL_BATCH_SIZE" "the data-parallel size ACTOR_GPUS/TP" "$((ACTOR_GPUS / TP))"
fi
if [[ "$ROLLOUT_BATCH_SIZE" =~ ^[1-9][0-9]*$ && "$N_SAMPLES_PER_PROMPT" =~ ^[1-9][0-9]*$ ]]; then
  check_divisible "ROLLOUT_BATCH_SIZE*N_SAMPLES_PER_PROMPT" "$((ROLLOUT_BATCH_SIZE * N_SAMPLES_PER_PROMPT))" \
    GLOBAL_BATCH_SIZE "$GLOBAL_BATCH_SIZE"
fi
check_user_simulator
if ! is_dry_run; then
  check_command ray "Run this inside slime's container (ray ships with slime)"
fi

if [[ "$COLOCATE" == 1 ]]; then
  TOTAL_GPUS=$((ACTOR_GPUS > ROLLOUT_GPUS ? ACTOR_GPUS : ROLLOUT_GPUS))
else
  TOTAL_GPUS=$((ACTOR_GPUS + ROLLOUT_GPUS))
fi
require_gpus "$TOTAL_GPUS" "GRPO (ACTOR_GPUS=$ACTOR_GPUS, ROLLOUT_GPUS=$ROLLOUT_GPUS, COLOCATE=$COLOCATE)"
finish_input_checks

# --- command ---
PLACEMENT_ARGS=(
  --actor-num-nodes 1
  --actor-num-gpus-per-node "$ACTOR_GPUS"
  --rollout-num-gpus "$ROLLOUT_GPUS"
  --rollout-num-gpus-per-engine "$ROLLOUT_GPUS_PER_ENGINE"
  --num-gpus-per-node "$TOTAL_GPUS"
)
if [[ "$COLOCATE" == 1 ]]; then
  PLACEMENT_ARGS+=(--colocate)
fi
PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size 1 --context-parallel-size 1)
if ((TP > 1)); then
  PARALLEL_ARGS+=(--sequence-parallel)
fi
SGLANG_ARGS=(--sglang-mem-fraction-static "$SGLANG_MEM_FRACTION")
if [[ -n "$SGLANG_SERVER_CONCURRENCY" ]]; then
  SGLANG_ARGS+=(--sglang-server-concurrency "$SGLANG_SERVER_CONCURRENCY")
fi
EVAL_ARGS=()
if ((EVAL_INTERVAL > 0)); then
  EVAL_ARGS=(
    --eval-prompt-data telecom_test "$EVAL_PROMPT_DATA"
    --eval-interval "$EVAL_INTERVAL"
    --n-samples-per-eval-prompt "$N_SAMPLES_PER_EVAL_PROMPT"
    --eval-temperature "$EVAL_TEMPERATURE"
    --eval-max-response-len "$EPISODE_MAX_TOKENS"
    --eval-max-context-len "$MAX_CONTEXT_LEN"
  )
fi
SAMPLING_ARGS=()
if [[ "$DYNAMIC_SAMPLING" == 1 ]]; then
  SAMPLING_ARGS=(
    --dynamic-sampling-filter-path reward.dynamic_filter.shaped_reward_nonzero_std_with_fallback
    --over-sampling-batch-size "$OVER_SAMPLING_BATCH_SIZE"
  )
fi
WANDB_ARGS=()
if [[ -n "$WANDB_PROJECT" ]]; then
  WANDB_ARGS=(--use-wandb --wandb-project "$WANDB_PROJECT" --wandb-group "$WANDB_GROUP")
fi

TRAIN_ARGS=(
  "${PLACEMENT_ARGS[@]}"
  "${MODEL_ARGS[@]}"
  # checkpoints: SAVE_DIR empty -> weights from REF_LOAD (optimizer fresh); otherwise resume from SAVE_DIR
  --hf-checkpoint "$HF_CHECKPOINT"
  --ref-load "$REF_LOAD"
  --load "$SAVE_DIR"
  --save "$SAVE_DIR"
  --save-interval "$SAVE_INTERVAL"
  # tasks: the prompt is the row index, the task itself travels in metadata
  --prompt-data "$PROMPT_DATA"
  --input-key index
  --metadata-key metadata
  --rollout-shuffle
  --num-rollout "$NUM_ROLLOUT"
  --rollout-batch-size "$ROLLOUT_BATCH_SIZE"
  --n-samples-per-prompt "$N_SAMPLES_PER_PROMPT"
  --global-batch-size "$GLOBAL_BATCH_SIZE"
  # the whole episode's response (sampled turns, tool results, user turns); one turn: TAU2_MAX_TOKENS_PER_TURN
  --rollout-max-response-len "$EPISODE_MAX_TOKENS"
  --rollout-max-context-len "$MAX_CONTEXT_LEN"
  --rollout-temperature "$TEMPERATURE"
  # newer slime requires top-p replay data on every sample unless top-p is 1.0
  --rollout-top-p 1.0
  --balance-data
  # the recipe's plugins (importable because the recipe root is on the job's PYTHONPATH)
  --custom-generate-function-path rollout.generate_with_tau.generate
  --custom-reward-post-process-path reward.tau2_reward_shaping.tau2_reward_post_process
  --custom-rollout-log-function-path rollout.rollout_log.log_rollout
  --custom-eval-rollout-log-function-path rollout.rollout_log.log_eval_rollout
  "${SAMPLING_ARGS[@]}"
  "${EVAL_ARGS[@]}"
  # GRPO loss
  --advantage-estimator grpo
  --use-kl-loss
  --kl-loss-coef "$KL_LOSS_COEF"
  --kl-loss-type low_var_kl
  --entropy-coef "$ENTROPY_COEF"
  --eps-clip "$EPS_CLIP"
  --eps-clip-high "$EPS_CLIP_HIGH"
  # optimizer
  --optimizer adam
  --lr "$LR"
  --lr-decay-style constant
  --weight-decay 0.1
  --adam-beta1 0.9
  --adam-beta2 0.98
  # memory and parallelism
  "${PARALLEL_ARGS[@]}"
  --recompute-granularity full
  --recompute-method uniform
  --recompute-num-layers 1
  --use-dynamic-batch-size
  --max-tokens-per-gpu "$MAX_TOKENS_PER_GPU"
  "${SGLANG_ARGS[@]}"
  # numerics
  --attention-dropout 0.0
  --hidden-dropout 0.0
  --accumulate-allreduce-grads-in-fp32
  --attention-softmax-in-fp32
  --attention-backend flash
  "${WANDB_ARGS[@]}"
  "${PASSTHROUGH_ARGS[@]}"
)

# The episode's limits travel as TAU2_* variables (rollout.settings.EpisodeConfig reads them in the job).
export TAU2_MAX_TOKENS_PER_TURN="$MAX_TOKENS_PER_TURN"
if [[ -n "$TURN_TIMEOUT_S" ]]; then export TAU2_TURN_TIMEOUT_S="$TURN_TIMEOUT_S"; fi
if [[ -n "$EPISODE_TIMEOUT_S" ]]; then export TAU2_EPISODE_TIMEOUT_S="$EPISODE_TIMEOUT_S"; fi
build_runtime_env \
  "PYTHONPATH=${MEGATRON_DIR}:${RECIPE_ROOT}" \
  "CUDA_DEVICE_MAX_CONNECTIONS=1" \
  "PYTHONUNBUFFERED=1" \
  "LITELLM_LOCAL_MODEL_COST_MAP=True"
log "Ray job environment: $(forwarded_env_summary)"

run_cd "$SLIME_DIR"
start_ray_head "$TOTAL_GPUS"
run_cmd ray job submit --address="$RAY_ADDRESS_URL" \
  --runtime-env-json "$RUNTIME_ENV_JSON" \
  -- python3 "$TRAIN_SCRIPT" "${TRAIN_ARGS[@]}"
