#!/usr/bin/env bash
# Convert a Hugging Face checkpoint to Megatron torch_dist format with slime's tools/convert_hf_to_torch_dist.py.
#
#   bash scripts/convert_hf_to_megatron.sh [--dry-run] [--help] [-- extra converter flags]
#
# Knobs (environment variables, defaults in brackets):
#   HF_CHECKPOINT  Hugging Face model folder                         [/root/Qwen3-4B-Instruct-2507]
#   SAVE_DIR       output torch_dist folder                          [${HF_CHECKPOINT}_torch_dist]
#   MODEL_NAME     architecture flags file scripts/models/NAME.sh    [qwen3-4B-Instruct-2507]
#   SLIME_DIR      slime checkout                                    [/root/slime]
#   MEGATRON_DIR   Megatron-LM checkout (put on PYTHONPATH)          [/root/Megatron-LM]
#   NPROC          GPUs used by the conversion (>1 runs torchrun)    [1]
#   FORCE          1 = write even if SAVE_DIR already holds a checkpoint [0]
#   PYTHON         Python interpreter                                [python3]
#
# Output: SAVE_DIR/latest_checkpointed_iteration.txt ("release") and SAVE_DIR/release/. Use SAVE_DIR as --ref-load.
# Needs a GPU (slime builds the Megatron model on CUDA). --dry-run prints the command and checks nothing but paths.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
parse_common_args "$@"

HF_CHECKPOINT="${HF_CHECKPOINT:-/root/Qwen3-4B-Instruct-2507}"
HF_CHECKPOINT="$(abs_path "${HF_CHECKPOINT%/}")"
SAVE_DIR="$(abs_path "${SAVE_DIR:-${HF_CHECKPOINT}_torch_dist}")"
MODEL_NAME="${MODEL_NAME:-qwen3-4B-Instruct-2507}"
SLIME_DIR="$(abs_path "${SLIME_DIR:-/root/slime}")"
MEGATRON_DIR="$(abs_path "${MEGATRON_DIR:-/root/Megatron-LM}")"
NPROC="${NPROC:-1}"
FORCE="${FORCE:-0}"

load_model_args "$MODEL_NAME"

check_hf_dir "$HF_CHECKPOINT" "HF_CHECKPOINT" \
  "Download it first: hf download Qwen/Qwen3-4B-Instruct-2507 --local-dir $HF_CHECKPOINT"
check_file "$SLIME_DIR/tools/convert_hf_to_torch_dist.py" "slime's converter" \
  "Set SLIME_DIR to your slime checkout (slime's container has it at /root/slime)"
check_dir "$MEGATRON_DIR" "MEGATRON_DIR" "Set MEGATRON_DIR to your Megatron-LM checkout (slime's container: /root/Megatron-LM)"
check_positive_int NPROC "$NPROC"
if [[ -f "$SAVE_DIR/latest_checkpointed_iteration.txt" && "$FORCE" != 1 ]]; then
  input_problem "SAVE_DIR '$SAVE_DIR' already holds a checkpoint; remove it, pick another SAVE_DIR, or set FORCE=1"
fi
require_gpus "$NPROC" "the conversion"
finish_input_checks

if [[ "$NPROC" -gt 1 ]]; then
  LAUNCHER=(torchrun --nproc-per-node "$NPROC")
else
  LAUNCHER=("$PYTHON")
fi

run_cd "$SLIME_DIR"
run_cmd env "PYTHONPATH=${MEGATRON_DIR}:${SLIME_DIR}${PYTHONPATH:+:$PYTHONPATH}" \
  "${LAUNCHER[@]}" "$SLIME_DIR/tools/convert_hf_to_torch_dist.py" \
  "${MODEL_ARGS[@]}" \
  --hf-checkpoint "$HF_CHECKPOINT" \
  --save "$SAVE_DIR" \
  "${PASSTHROUGH_ARGS[@]}"

if ! is_dry_run; then
  log "done: $SAVE_DIR (use it as REF_LOAD for scripts/run_sft.sh)"
fi
