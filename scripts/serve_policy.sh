#!/usr/bin/env bash
# Serve a policy checkpoint (Hugging Face format) with sglang for evaluation, teacher traces or RFT sampling.
# eval/evaluate_tau2.py can start its own server; start this one yourself to share it between runs, then pass
# SGLANG_URL=http://HOST:PORT to scripts/run_eval.sh.
#
#   bash scripts/serve_policy.sh [--dry-run] [--help] [-- extra sglang.launch_server flags]
#   eval "$(DETACH=1 bash scripts/serve_policy.sh)"     # start in the background, then export POLICY_URL
#
# Knobs (environment variables, defaults in brackets):
#   CHECKPOINT         Hugging Face model folder (scripts/convert_megatron_to_hf.sh output for a trained one)
#                                                                      [/root/Qwen3-4B-Instruct-2507]
#   SERVED_MODEL_NAME  model name for the OpenAI-compatible API        [basename of CHECKPOINT]
#   HOST / PORT        listen address                                  [127.0.0.1 / 30000]
#   SERVE_GPUS         GPU indices for the server (its CUDA_VISIBLE_DEVICES) [$CUDA_VISIBLE_DEVICES, else 0]
#   TP                 tensor parallel size                            [number of SERVE_GPUS]
#   MEM_FRACTION       sglang --mem-fraction-static                    [0.85]
#   CONTEXT_LENGTH     max context (empty = the model's)               [32768]
#   TOOL_CALL_PARSER   sglang --tool-call-parser for /v1/chat/completions (empty disables) [qwen25]
#   DETACH             1 = run in the background, wait until it answers, print the exports on stdout [0]
#   LOG_FILE           server log when DETACH=1                        [/tmp/tau2_policy_${PORT}.log]
#   PID_FILE           server pid when DETACH=1 (stop: kill "$(cat PID_FILE)") [/tmp/tau2_policy_${PORT}.pid]
#   READY_TIMEOUT      seconds to wait for the server when DETACH=1    [900]
#   PYTHON             Python with sglang                              [python3]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source-path=SCRIPTDIR source=lib/sglang_server.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/sglang_server.sh"
parse_common_args "$@"

CHECKPOINT="${CHECKPOINT:-/root/Qwen3-4B-Instruct-2507}"
MODEL_PATH="$(abs_path "${CHECKPOINT%/}")"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-$(basename "$MODEL_PATH")}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-30000}"
SERVE_GPUS="${SERVE_GPUS:-${CUDA_VISIBLE_DEVICES:-0}}"
TP="${TP:-$(printf '%s' "$SERVE_GPUS" | tr ',' '\n' | grep -c .)}"
MEM_FRACTION="${MEM_FRACTION:-0.85}"
CONTEXT_LENGTH="${CONTEXT_LENGTH-32768}"
TOOL_CALL_PARSER="${TOOL_CALL_PARSER-qwen25}"
DETACH="${DETACH:-0}"
LOG_FILE="${LOG_FILE:-/tmp/tau2_policy_${PORT}.log}"
PID_FILE="${PID_FILE:-/tmp/tau2_policy_${PORT}.pid}"
READY_TIMEOUT="${READY_TIMEOUT:-900}"

print_ready_exports() {
  printf 'export POLICY_URL=%q\n' "http://$HOST:$PORT"
  printf 'export POLICY_MODEL=%q\n' "$SERVED_MODEL_NAME"
}

check_sglang_inputs
finish_input_checks
launch_sglang_server
