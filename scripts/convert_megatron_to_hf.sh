#!/usr/bin/env bash
# Convert a Megatron torch_dist checkpoint saved by slime back to Hugging Face format
# (slime's tools/convert_torch_dist_to_hf.py), e.g. to serve it with sglang for evaluation or as --hf-checkpoint.
#
#   bash scripts/convert_megatron_to_hf.sh [--dry-run] [--help] [-- extra converter flags]
#
# Knobs (environment variables, defaults in brackets):
#   CKPT_DIR       slime --save folder (holds latest_checkpointed_iteration.txt and iter_*)
#                                                                    [/root/Qwen3-4B-Instruct-2507_sft_telecom]
#   ITER           iteration to convert: a number, "release", or "latest" [latest]
#   OUTPUT_DIR     Hugging Face output folder                        [${CKPT_DIR}_hf]
#   ORIGIN_HF_DIR  the original HF model (config, tokenizer, chat template are copied from it)
#                                                                    [/root/Qwen3-4B-Instruct-2507]
#   VOCAB_SIZE     true vocabulary size; strips Megatron's embedding padding [151936]
#   FORCE          1 = overwrite OUTPUT_DIR if it exists             [0]
#   SLIME_DIR      slime checkout                                    [/root/slime]
#   MEGATRON_DIR   Megatron-LM checkout (put on PYTHONPATH)          [/root/Megatron-LM]
#   PYTHON         Python interpreter                                [python3]
#
# Runs on CPU (no GPU needed).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
parse_common_args "$@"

CKPT_DIR="${CKPT_DIR:-/root/Qwen3-4B-Instruct-2507_sft_telecom}"
CKPT_DIR="$(abs_path "${CKPT_DIR%/}")"
ITER="${ITER:-latest}"
OUTPUT_DIR="$(abs_path "${OUTPUT_DIR:-${CKPT_DIR}_hf}")"
ORIGIN_HF_DIR="$(abs_path "${ORIGIN_HF_DIR:-/root/Qwen3-4B-Instruct-2507}")"
VOCAB_SIZE="${VOCAB_SIZE:-151936}"
FORCE="${FORCE:-0}"
SLIME_DIR="$(abs_path "${SLIME_DIR:-/root/slime}")"
MEGATRON_DIR="$(abs_path "${MEGATRON_DIR:-/root/Megatron-LM}")"

TRACKER="$CKPT_DIR/latest_checkpointed_iteration.txt"
if [[ "$ITER" == latest ]]; then
  if [[ -f "$TRACKER" ]]; then
    ITER="$(tr -d '[:space:]' <"$TRACKER")"
  else
    input_problem "CKPT_DIR has no latest_checkpointed_iteration.txt: '$CKPT_DIR'. Point CKPT_DIR at the --save folder of a finished run, or set ITER"
    ITER="LATEST"
  fi
fi
case "$ITER" in
  release) ITER_DIR="$CKPT_DIR/release" ;;
  LATEST) ITER_DIR="$CKPT_DIR/iter_LATEST" ;;
  *)
    if [[ "$ITER" =~ ^[0-9]+$ ]]; then
      printf -v ITER_DIR '%s/iter_%07d' "$CKPT_DIR" "$((10#$ITER))"
    else
      input_problem "ITER must be a number, 'release' or 'latest', got '$ITER'"
      ITER_DIR="$CKPT_DIR/iter_$ITER"
    fi
    ;;
esac

[[ "$ITER_DIR" == */iter_LATEST ]] || check_dir "$ITER_DIR" "checkpoint iteration" \
  "List the iterations with: ls $CKPT_DIR"
check_hf_dir "$ORIGIN_HF_DIR" "ORIGIN_HF_DIR" "Set ORIGIN_HF_DIR to the Hugging Face model the run started from"
check_file "$SLIME_DIR/tools/convert_torch_dist_to_hf.py" "slime's converter" \
  "Set SLIME_DIR to your slime checkout (slime's container has it at /root/slime)"
check_dir "$MEGATRON_DIR" "MEGATRON_DIR" "Set MEGATRON_DIR to your Megatron-LM checkout (slime's container: /root/Megatron-LM)"
check_positive_int VOCAB_SIZE "$VOCAB_SIZE"
if [[ -e "$OUTPUT_DIR" && "$FORCE" != 1 ]]; then
  input_problem "OUTPUT_DIR '$OUTPUT_DIR' already exists; remove it, pick another OUTPUT_DIR, or set FORCE=1"
fi
finish_input_checks

FORCE_ARGS=()
[[ "$FORCE" == 1 ]] && FORCE_ARGS=(--force)

run_cd "$SLIME_DIR"
run_cmd env "PYTHONPATH=${MEGATRON_DIR}:${SLIME_DIR}${PYTHONPATH:+:$PYTHONPATH}" \
  "$PYTHON" "$SLIME_DIR/tools/convert_torch_dist_to_hf.py" \
  --input-dir "$ITER_DIR" \
  --output-dir "$OUTPUT_DIR" \
  --origin-hf-dir "$ORIGIN_HF_DIR" \
  --vocab-size "$VOCAB_SIZE" \
  "${FORCE_ARGS[@]}" \
  "${PASSTHROUGH_ARGS[@]}"

if ! is_dry_run; then
  log "done: $OUTPUT_DIR"
fi
