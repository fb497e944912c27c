#!/usr/bin/env bash
# Supervised fine-tuning (SFT) of the policy on tau2 traces with slime (Megatron backend, train_async.py,
# --debug-train-only: no sglang engines). Data rows: {"messages": [...], "tools": [...], "metadata": {...}} from
# examples/generate_sft_traces.py. The qwen3 loss mask trains assistant turns only.
#
#   bash scripts/run_sft.sh [--dry-run] [--help] [-- extra train_async.py flags]
#
# Knobs (environment variables, defaults in brackets):
#   SFT_DATA            SFT jsonl (messages / tools / metadata)        [/root/tau2_data/sft/telecom_sft_train.jsonl]
#   HF_CHECKPOINT       Hugging Face model (tokenizer, chat template)  [/root/Qwen3-4B-Instruct-2507]
#   REF_LOAD            Megatron checkpoint to start from (--ref-load; from scripts/convert_hf_to_megatron.sh)
#                                                                      [${HF_CHECKPOINT}_torch_dist]
#   SAVE_DIR            --save and --load: a rerun resumes from here   [/root/Qwen3-4B-Instruct-2507_sft_telecom]
#   SAVE_INTERVAL       save every N steps                             [50]
#   MODEL_NAME          scripts/models/NAME.sh with MODEL_ARGS         [qwen3-4B-Instruct-2507]
#   NUM_GPUS            GPUs for training                              [4]
#   TP                  tensor parallel size (sequence parallel when > 1) [2]
#   NUM_EPOCH           epochs over SFT_DATA                           [2]
#   BATCH_SIZE          conversations per step (--rollout-batch-size = --global-batch-size) [16]
#   LR / MIN_LR         peak / final learning rate, cosine decay       [1e-5 / 1e-6]
#   LR_WARMUP_FRACTION  warm-up share of the steps                     [0.1]
#   WEIGHT_DECAY        AdamW weight decay                             [0.1]
#   MAX_TOKENS_PER_GPU  dynamic batching budget per GPU per micro-batch [20480]
#   WANDB_PROJECT       set to log to W&B (--use-wandb); WANDB_GROUP  [unset / tau2-sft]; key from WANDB_API_KEY
#   SLIME_DIR           slime checkout                                 [/root/slime]
#   MEGATRON_DIR        Megatron-LM checkout                           [/root/Megatron-LM]
#   RAY_START           0 = do not start Ray (use a running cluster)   [1]
#   RAY_DASHBOARD_PORT  Ray dashboard / job API port                   [8265]
#   RAY_ADDRESS_URL     job API address for `ray job submit`           [http://127.0.0.1:${RAY_DASHBOARD_PORT}]
#   MASTER_ADDR         node IP for `ray start --head`                 [127.0.0.1]
#   FORWARD_ENV         extra variable names to pass to the Ray job    []
#
# The Ray job sees PYTHONPATH=MEGATRON_DIR:<recipe root>, every TAU2_* variable and OPENAI_API_KEY, GEMINI_API_KEY,
# WANDB_API_KEY, HF_TOKEN when set (secret values are shown as *** in every printed command).
# Without --loss-type sft_loss slime would run GRPO with one sample per prompt (zero advantage: nothing learned);
# --apply-chat-template is deliberately absent (newer slime's SFT mask needs the message list).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
parse_common_args "$@"

SFT_DATA="$(abs_path "${SFT_DATA:-/root/tau2_data/sft/telecom_sft_train.jsonl}")"
HF_CHECKPOINT="${HF_CHECKPOINT:-/root/Qwen3-4B-Instruct-2507}"
HF_CHECKPOINT="$(abs_path "${HF_CHECKPOINT%/}")"
REF_LOAD="$(abs_path "${REF_LOAD:-${HF_CHECKPOINT}_torch_dist}")"
SAVE_DIR="$(abs_path "${SAVE_DIR:-/root/Qwen3-4B-Instruct-2507_sft_telecom}")"
SAVE_INTERVAL="${SAVE_INTERVAL:-50}"
MODEL_NAME="${MODEL_NAME:-qwen3-4B-Instruct-2507}"
NUM_GPUS="${NUM_GPUS:-4}"
TP="${TP:-2}"
NUM_EPOCH="${NUM_EPOCH:-2}"
BATCH_SIZE="${BATCH_SIZE:-16}"
LR="${LR:-1e-5}"
MIN_LR="${MIN_LR:-1e-6}"
LR_WARMUP_FRACTION="${LR_WARMUP_FRACTION:-0.1}"
WEIGHT_DECAY="${WEIGHT_DECAY:-0.1}"
MAX_TOKENS_PER_GPU="${MAX_TOKENS_PER_GPU:-20480}"
WANDB_PROJECT="${WANDB_PROJECT:-}"
WANDB_GROUP="${WANDB_GROUP:-tau2-sft}"
SLIME_DIR="$(abs_path "${SLIME_DIR:-/root/slime}")"
MEGATRON_DIR="$(abs_path "${MEGATRON_DIR:-/root/Megatron-LM}")"
RAY_DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
RAY_ADDRESS_URL="${RAY_ADDRESS_URL:-http://127.0.0.1:${RAY_DASHBOARD_PORT}}"

load_model_args "$MODEL_NAME"

check_nonempty_file "$SFT_DATA" "SFT_DATA" \
  "Make it with: python examples/generate_sft_traces.py --source gold --domain telecom --split train --tokenizer $HF_CHECKPOINT --output $SFT_DATA, then check it: python examples/check_sft_data.py $SFT_DATA --tokenizer $HF_CHECKPOINT"
check_hf_dir "$HF_CHECKPOINT" "HF_CHECKPOINT" \
  "Download it first: hf download Qwen/Qwen3-4B-Instruct-2507 --local-dir $HF_CHECKPOINT"
check_megatron_dir "$REF_LOAD" "REF_LOAD" "Convert the HF model first: bash scripts/convert_hf_to_megatron.sh"
check_file "$SLIME_DIR/train_async.py" "slime's train_async.py" "Set SLIME_DIR to your slime checkout"
check_dir "$MEGATRON_DIR" "MEGATRON_DIR" "Set MEGATRON_DIR to your Megatron-LM checkout"
for knob in NUM_GPUS TP NUM_EPOCH BATCH_SIZE SAVE_INTERVAL MAX_TOKENS_PER_GPU; do
  check_positive_int "$knob" "${!knob}"
done
check_divisible NUM_GPUS "$NUM_GPUS" TP "$TP"
if [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ && "$TP" =~ ^[1-9][0-9]*$ ]]; then
  check_divisible BATCH_SIZE "$BATCH_SIZE" "the data-parallel size NUM_GPUS/TP" "$((NUM_GPUS / TP))"
fi
if ! is_dry_run; then
  check_command ray "Run this inside slime's container (ray ships with slime)"
fi
require_gpus "$NUM_GPUS" "SFT (NUM_GPUS)"
finish_input_checks

PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size 1 --context-parallel-size 1)
if ((TP > 1)); then
  PARALLEL_ARGS+=(--sequence-parallel)
fi
WANDB_ARGS=()
if [[ -n "$WANDB_PROJECT" ]]; then
  WANDB_ARGS=(--use-wandb --wandb-project "$WANDB_PROJECT" --wandb-group "$WANDB_GROUP")
fi

TRAIN_ARGS=(
  --actor-num-nodes 1
  --actor-num-gpus-per-node "$NUM_GPUS"
  --num-gpus-per-node "$NUM_GPUS"
  "${MODEL_ARGS[@]}"
  # checkpoints: start from REF_LOAD unless SAVE_DIR already holds a checkpoint (then resume)
  --hf-checkpoint "$HF_CHECKPOINT"
  --ref-load "$REF_LOAD"
  --load "$SAVE_DIR"
  --save "$SAVE_DIR"
  --save-interval "$SAVE_INTERVAL"
  # SFT data and loss
  --rollout-function-path slime.rollout.sft_rollout.generate_rollout
  --prompt-data "$SFT_DATA"
  --input-key messages
  --tool-key tools
  --loss-mask-type qwen3
  --rollout-shuffle
  --num-epoch "$NUM_EPOCH"
  --n-samples-per-prompt 1
  --rollout-batch-size "$BATCH_SIZE"
  --global-batch-size "$BATCH_SIZE"
  --loss-type sft_loss
  --calculate-per-token-loss
  --disable-compute-advantages-and-returns
  --debug-train-only
  # optimizer
  --optimizer adam
  --lr "$LR"
  --lr-decay-style cosine
  --min-lr "$MIN_LR"
  --lr-warmup-fraction "$LR_WARMUP_FRACTION"
  --weight-decay "$WEIGHT_DECAY"
  --adam-beta1 0.9
  --adam-beta2 0.95
  # memory and parallelism
  "${PARALLEL_ARGS[@]}"
  --recompute-granularity full
  --recompute-method uniform
  --recompute-num-layers 1
  --use-dynamic-batch-size
  --max-tokens-per-gpu "$MAX_TOKENS_PER_GPU"
  # numerics
  --attention-dropout 0.0
  --hidden-dropout 0.0
  --accumulate-allreduce-grads-in-fp32
  --attention-softmax-in-fp32
  --attention-backend flash
  "${WANDB_ARGS[@]}"
  "${PASSTHROUGH_ARGS[@]}"
)

build_runtime_env \
  "PYTHONPATH=${MEGATRON_DIR}:${RECIPE_ROOT}" \
  "CUDA_DEVICE_MAX_CONNECTIONS=1" \
  "PYTHONUNBUFFERED=1" \
  "LITELLM_LOCAL_MODEL_COST_MAP=True" \
  "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
log "Ray job environment: $(forwarded_env_summary)"

run_cd "$SLIME_DIR"
start_ray_head "$NUM_GPUS"
run_cmd ray job submit --address="$RAY_ADDRESS_URL" \
  --runtime-env-json "$RUNTIME_ENV_JSON" \
  -- python3 "$SLIME_DIR/train_async.py" "${TRAIN_ARGS[@]}"
